"""Writing and checking ``submission.csv`` for both tracks (SPEC section 5).

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
from pathlib import Path

from kernel.errors import KernelError
from kernel.store import atomic_write

logger = logging.getLogger(__name__)

COLUMNS = {"recognition": "landmarks", "retrieval": "images"}
MAX_IMAGES = 100


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


def write_submission(track: str, predictions: dict, test_ids, path) -> Path:
    """Atomically write ``submission.csv``: one row per test id, in the order of ``test_ids``.

    Args:
        track: ``recognition`` (predictions: id -> ``(landmark_id, confidence)`` or ``None``) or
            ``retrieval`` (id -> list of index ids, best first; more than 100 are cut).
        predictions: ids missing here get an empty field; ids not in ``test_ids`` are dropped (logged).
        test_ids: every test id, each once.
    """
    column = _column(track)
    test_ids = [str(i) for i in test_ids]
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
    data = buf.getvalue().encode()
    atomic_write(path, lambda fh: fh.write(data))
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
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
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
    return out


def _parse_field(track: str, field: str, where: str):
    if not field:
        return None
    parts = field.split()
    if track == "recognition":
        if len(parts) != 2:
            raise KernelError(f"{where}: landmarks must be '<landmark_id> <confidence>', got {field!r}")
        try:
            landmark = int(parts[0])
            conf = float(parts[1])
        except ValueError:
            raise KernelError(f"{where}: landmarks must be '<integer landmark_id> <confidence>', got {field!r}") from None
        if not math.isfinite(conf):
            raise KernelError(f"{where}: confidence {parts[1]} is not a finite number")
        return str(landmark), conf
    if len(parts) > MAX_IMAGES:
        raise KernelError(f"{where}: {len(parts)} index ids, at most {MAX_IMAGES} allowed")
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
