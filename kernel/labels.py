"""Train labels (``train.csv``: ``id,landmark_id``), read once and checked before anything depends on them:
the one reader and set of checks of post-processing and of training (:func:`kernel.train.data.read_labels`).

Kaggle compares submissions as text: a recognition answer scores only when its landmark id is written exactly
as the solution file writes it, which is a plain non-negative decimal integer (``1005``, never ``1005.0``,
``+1005``, ``01005`` or ``1_005``). A label that is not written that way would be copied into every submission
that predicts it and could never score, so it is refused here, naming the file and the line. The landmark id
also has to fit the int64 the metric code and the submission checker parse it into.

Image ids must be writable into a CSV field unchanged (no comma, quote, whitespace or control character):
Kaggle's ids are hexadecimal strings, and anything else would be quoted or split by the CSV writer.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from kernel.errors import KernelError
from kernel.files import not_utf8

INT64_MAX = 2**63 - 1
# a landmark id as Kaggle writes it: a non-negative decimal integer without sign, leading zeros or separators
LANDMARK_ID = re.compile(r"0|[1-9][0-9]*")
# characters an id may not hold: the CSV writer would quote or split the field (and Kaggle's ids are hex)
_UNSAFE_ID = re.compile(r'[\s,"\'\x00-\x1f\x7f]')


def landmark_id_problem(text: str) -> str | None:
    """Why ``text`` is not a landmark id as Kaggle writes it, or ``None`` when it is one."""
    if not LANDMARK_ID.fullmatch(text) or not text.isascii():
        return "is not a non-negative integer written as Kaggle writes it (digits only, no sign, decimals or leading zeros)"
    if int(text) > INT64_MAX:
        return f"is larger than the largest 64-bit integer ({INT64_MAX})"
    return None


def id_problem(text: str) -> str | None:
    """Why ``text`` cannot be an image id in a submission CSV, or ``None``."""
    if not text:
        return "is empty"
    if _UNSAFE_ID.search(text):
        return "holds a comma, quote, whitespace or control character, which a CSV field cannot hold unchanged"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8 (an undecodable file name)"
    return None


def first_bad_id(ids) -> tuple[str, str] | None:
    """``(id, why)`` for the first of ``ids`` that a CSV field cannot hold, or ``None`` (one pass over all)."""
    ids = list(ids)
    joined = "".join(ids)
    if "" not in ids and not _UNSAFE_ID.search(joined):
        try:
            joined.encode("utf-8")
            return None
        except UnicodeEncodeError:
            pass
    return next((i, id_problem(i)) for i in ids if id_problem(i))


def read_label_csv(path: str | Path, what: str = "train labels") -> pd.DataFrame:
    """A label CSV as text (every column ``str``, nothing read as missing); ``what`` names the file in errors."""
    path = Path(path)
    if not path.is_file():
        raise KernelError(f"{path}: {what} file not found")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise not_utf8(path, exc) from None
    except Exception as exc:  # parser errors, empty file, a field past the parser's limits
        raise KernelError(f"{path}: cannot read {what} ({type(exc).__name__}: {exc})") from None


def check_train_labels(df: pd.DataFrame, name: str, lines=None, non_landmark: bool = False) -> pd.Series:
    """Columns ``id`` and ``landmark_id`` of ``df`` (text) -> Series id -> landmark id (str), both stripped.

    Raises :class:`KernelError` naming ``name`` and the line for a missing column, an empty, non-integer,
    negative or too large landmark id, an id a CSV cannot hold, or an id listed twice. ``lines``: the file line
    of each row (default: row + 2, the header being line 1). ``non_landmark``: also accept ``-1``, an image
    that shows no landmark (validation labels).
    """
    for col in ("id", "landmark_id"):
        if col not in df.columns:
            raise KernelError(f"{name}: column '{col}' is missing (columns: {', '.join(map(str, df.columns))})")
    ids = df["id"].astype(str).str.strip()
    labels = df["landmark_id"].astype(str).str.strip()
    line = np.arange(len(df)) + 2 if lines is None else np.asarray(lines)
    where = lambda row: f"{name}:{line[row]}"  # noqa: E731 - file line of row ``row`` (0-based)
    bad = ~labels.str.fullmatch(LANDMARK_ID.pattern) | (labels.str.len() > 19)
    if non_landmark:
        bad &= labels != "-1"
    for row in map(int, bad.to_numpy().nonzero()[0][:1]):
        raise KernelError(f"{where(row)}: landmark_id {labels.iloc[row]!r} {landmark_id_problem(labels.iloc[row])}")
    for row in map(int, (labels.str.len() == 19).to_numpy().nonzero()[0]):
        if int(labels.iloc[row]) > INT64_MAX:
            raise KernelError(f"{where(row)}: landmark_id {labels.iloc[row]!r} {landmark_id_problem(labels.iloc[row])}")
    bad_ids = ids.str.contains(_UNSAFE_ID.pattern, regex=True) | (ids == "")
    for row in map(int, bad_ids.to_numpy().nonzero()[0][:1]):
        raise KernelError(f"{where(row)}: id {ids.iloc[row]!r} {id_problem(ids.iloc[row])}")
    dup = ids.duplicated()
    if dup.any():
        row = int(dup.to_numpy().nonzero()[0][0])
        raise KernelError(f"{where(row)}: id {ids.iloc[row]} appears twice")
    return pd.Series(labels.to_numpy(), index=ids.to_numpy())


def read_train_labels(train_labels) -> pd.Series:
    """``train.csv`` (``id,landmark_id``) or a DataFrame with those columns -> Series id -> landmark id (str),
    checked by :func:`check_train_labels`. A Series is what this function returned before: used as it is."""
    if isinstance(train_labels, pd.Series):
        return train_labels
    if isinstance(train_labels, pd.DataFrame):
        return check_train_labels(train_labels, "train labels")
    return check_train_labels(read_label_csv(train_labels), str(train_labels))
