"""Writing and checking ``submission.csv`` for both tracks (docs/kaggle.md#submission-formats).

* recognition: header ``id,landmarks``; ``landmarks`` = ``"<landmark_id> <confidence>"`` or empty;
* retrieval: header ``id,images``; ``images`` = up to 100 space-separated index ids, best first, or empty.

Every test id appears exactly once; an id without a prediction (e.g. an image that could not be
decoded) still gets its row, with an empty field. The file is written atomically: a crash leaves the
previous file (or none), never half a file.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import re
from pathlib import Path

from kernel.errors import KernelError
from kernel.files import atomic_write, csv_text
from kernel.labels import first_bad_id, landmark_id_problem

logger = logging.getLogger(__name__)

COLUMNS = {"recognition": "landmarks", "retrieval": "images"}
MAX_IMAGES = 100
_OTHER_SPACE = re.compile(r"[^\S ]")  # whitespace other than the space that separates a field's parts


def _column(track: str) -> str:
    if track not in COLUMNS:
        raise KernelError(f"unknown track '{track}' (expected recognition or retrieval)")
    return COLUMNS[track]


def format_prediction(track: str, prediction) -> str:
    """One prediction as its submission field ('' for ``None`` / empty)."""
    if not prediction:
        return ""
    if track == "recognition":
        landmark, conf = prediction
        conf = float(conf)
        if not math.isfinite(conf):
            raise ValueError(f"confidence {conf} is not finite")
        return f"{landmark} {conf!r}"  # repr: the shortest text that reads back as the same float
    return " ".join(str(i) for i in list(prediction)[:MAX_IMAGES])


def replace_checked(path: Path, data: bytes, check) -> None:
    """Write ``data`` atomically to ``path`` (:func:`kernel.files.atomic_write`), running ``check(tmp_path)``
    on the candidate first: one that fails its check never replaces the previous file."""

    def checked(tmp: Path) -> None:
        try:
            check(tmp)
        except KernelError as exc:
            kept = "keeps the previous file" if path.exists() else "was not written"
            raise KernelError(f"{path}: the new submission failed its check and {kept}: "
                              f"{str(exc).replace(str(tmp), 'candidate')}") from None

    atomic_write(Path(path), lambda fh: fh.write(data), check=checked)


def write_submission(track: str, predictions: dict, test_ids, path) -> Path:
    """Atomically write ``submission.csv``: one row per test id, in the order of ``test_ids``; the new file
    is checked (:func:`check_submission`) before it replaces an earlier one (:func:`replace_checked`).

    Args:
        track: ``recognition`` (predictions: id -> ``(landmark_id, confidence)`` or ``None``) or
            ``retrieval`` (id -> list of index ids, best first; more than 100 are cut).
        predictions: ids missing here get an empty field; ids not in ``test_ids`` are dropped (logged).
        test_ids: every test id, each once.
    """
    column = _column(track)
    test_ids = [str(i) for i in test_ids]
    bad = first_bad_id(test_ids)
    if bad:
        raise KernelError(f"test id {bad[0].encode('utf-8', 'backslashreplace').decode()!r} {bad[1]}")
    if len(set(test_ids)) != len(test_ids):
        seen: set[str] = set()
        dup = next(i for i in test_ids if i in seen or seen.add(i))
        raise KernelError(f"test id {dup} is listed twice")
    extra = set(map(str, predictions)) - set(test_ids)
    if extra:
        logger.warning("dropping %d predictions for ids that are not test ids (e.g. %s)", len(extra), min(extra))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", column])
    empty = 0
    for i in test_ids:
        field = format_prediction(track, predictions.get(i))
        empty += field == ""
        w.writerow([i, field])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_checked(path, buf.getvalue().encode(), lambda tmp: check_submission(track, tmp, test_ids))
    logger.info("wrote %s: %d rows (%d empty)", path, len(test_ids), empty)
    return path


def read_submission(track: str, path) -> dict:
    """Parse and check a submission file: id -> ``(landmark, confidence)`` / list of ids / ``None``.

    Raises :class:`KernelError` naming the file and line for a wrong header, a repeated id, a malformed
    recognition field (not ``<integer landmark> <finite confidence>``) or more than 100 retrieval ids.
    """
    column = _column(track)
    path = Path(path)
    if not path.is_file():
        raise KernelError(f"{path}: submission file not found")
    out: dict = {}
    with csv_text(path) as fh:
        _read_rows(csv.reader(fh), track, column, path, out)
    return out


def _read_rows(reader, track: str, column: str, path: Path, out: dict) -> None:
    header = next(reader, None)
    if header != ["id", column]:
        raise KernelError(f"{path}: header must be 'id,{column}' for the {track} track, got {','.join(header or [])!r}")
    for line, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != 2:
            raise KernelError(f"{path}:{line}: expected 2 fields, got {len(row)}")
        key, field = row[0].strip(), row[1].strip()
        if not key:
            raise KernelError(f"{path}:{line}: empty id")
        if key in out:
            raise KernelError(f"{path}:{line}: id {key} appears twice")
        out[key] = _parse_field(track, field, f"{path}:{line}")


def _parse_field(track: str, field: str, where: str):
    """One field, compared later as text as Kaggle does: ids and landmark ids are kept exactly as written
    (no ``int()`` normalisation: ``+1005`` or ``1_005`` would never match ``1005`` on Kaggle, so they are
    refused); parts are separated by single spaces (a tab or newline is refused)."""
    if not field:
        return None
    if _OTHER_SPACE.search(field):
        raise KernelError(f"{where}: parts must be separated by spaces (found a tab or other whitespace)")
    parts = field.split()
    if track == "recognition":
        if len(parts) != 2:
            raise KernelError(f"{where}: landmarks must be '<landmark_id> <confidence>', got {field[:80]!r}")
        if landmark_id_problem(parts[0]):
            raise KernelError(f"{where}: landmarks must be '<integer landmark_id> <confidence>': "
                              f"{parts[0][:40]!r} {landmark_id_problem(parts[0])}")
        try:
            conf = float(parts[1])
        except ValueError:
            raise KernelError(f"{where}: confidence {parts[1][:40]!r} is not a number") from None
        if not math.isfinite(conf):
            raise KernelError(f"{where}: confidence {parts[1]} is not a finite number")
        return parts[0], conf
    if len(parts) > MAX_IMAGES:
        raise KernelError(f"{where}: {len(parts)} index ids, at most {MAX_IMAGES} allowed")
    bad = first_bad_id(parts)
    if bad:
        raise KernelError(f"{where}: index id {bad[0][:40]!r} {bad[1]}")
    return parts


def check_submission(track: str, path, test_ids=None, index_ids=None) -> dict:
    """Check a submission file; returns a summary, raises :class:`KernelError` with the reason.

    Checks the format (:func:`read_submission`), that the rows are exactly ``test_ids`` (when given) and
    that retrieval answers name ``index_ids`` (when given). Summary keys: ``rows``, ``predicted``
    (non-empty rows), ``empty``, and ``mean_images`` (retrieval) or ``landmarks`` (distinct predicted
    landmarks, recognition), and ``duplicates`` (retrieval rows repeating an id: allowed by Kaggle,
    counted once).
    """
    preds = read_submission(track, path)
    if test_ids is not None:
        want = {str(i) for i in test_ids}
        missing = want - set(preds)
        extra = set(preds) - want
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"{len(missing)} test ids missing (e.g. {min(missing)})")
            if extra:
                parts.append(f"{len(extra)} ids that are not test ids (e.g. {min(extra)})")
            raise KernelError(f"{path}: " + ", ".join(parts))
    predicted = {k: v for k, v in preds.items() if v}
    summary = {"track": track, "rows": len(preds), "predicted": len(predicted), "empty": len(preds) - len(predicted)}
    if track == "retrieval":
        if index_ids is not None:
            index = {str(i) for i in index_ids}
            for k, v in predicted.items():
                bad = [i for i in v if i not in index]
                if bad:
                    raise KernelError(f"{path}: row {k} names {bad[0]}, which is not an index id")
        summary["mean_images"] = sum(len(v) for v in predicted.values()) / max(len(predicted), 1)
        summary["duplicates"] = sum(len(set(v)) != len(v) for v in predicted.values())
    else:
        summary["landmarks"] = len({v[0] for v in predicted.values()})
    return summary
