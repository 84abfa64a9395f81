"""The two competition metrics, with Kaggle's conventions (the Google Landmarks scoring code).

* Recognition: Global Average Precision (GAP, micro-AP), :func:`gap`.
* Retrieval: mean Average Precision at 100 (mAP@100), :func:`map_at_k`.

Both are pure functions over plain dicts; :func:`read_solution` reads a Kaggle solution file
(``id,landmarks,Usage`` or ``id,images,Usage``) into the dicts they take.
"""
from __future__ import annotations

import csv
from pathlib import Path

from kernel.errors import KernelError
from kernel.files import csv_text

USAGES = ("Public", "Private", "Ignored")


def _label(x) -> str:
    """Landmark ids compare as integers when they are integers ("012" == "12" == 12), else as text."""
    s = str(x).strip()
    try:
        return str(int(s))
    except ValueError:
        return s


def gap(predictions: dict, solution: dict) -> float:
    """Global Average Precision of recognition predictions.

    Args:
        predictions: test id -> ``(landmark, confidence)``, or ``None`` / absent for no prediction.
        solution: test id -> collection of true landmarks; empty for a non-landmark image. Only the ids of
            the solution are scored (predictions for other ids are ignored).

    Kaggle's conventions: every prediction (one per image) is ranked by confidence, descending; equal
    confidences are ordered by test id, then landmark, ascending. GAP = (1/M) sum_i P(i) rel(i) where M is
    the number of solution images with at least one true landmark, P(i) the precision over the first i
    predictions and rel(i) = 1 when prediction i is one of its image's true landmarks. A prediction on a
    non-landmark image counts as wrong (it lowers the precision of everything ranked below it); an image
    without a prediction only costs its missing true positive. Landmarks compare as integers when they
    are integers ("12" == 12).
    Returns 0.0 when no solution image has a true landmark.
    """
    truth = {str(k): {_label(x) for x in v} for k, v in solution.items()}
    m = sum(1 for v in truth.values() if v)
    if m == 0:
        return 0.0
    preds = [
        (str(k), _label(p[0]), float(p[1]))
        for k, p in predictions.items()
        if p is not None and str(k) in truth
    ]
    preds.sort(key=lambda t: (t[0], t[1]))
    preds.sort(key=lambda t: t[2], reverse=True)
    total = correct = 0
    score = 0.0
    for key, landmark, _ in preds:
        total += 1
        if landmark in truth[key]:
            correct += 1
            score += correct / total
    return score / m


def average_precision(prediction, relevant, k: int = 100) -> float:
    """AP@k of one ranked list: sum_{i<=k} P(i) rel(i) / min(#relevant, k).

    A repeated id counts once: its later occurrences are not relevant (but still take a rank).
    0.0 when ``relevant`` is empty.
    """
    relevant = {str(x) for x in relevant}
    if not relevant:
        return 0.0
    seen: set[str] = set()
    correct = 0
    ap = 0.0
    for rank, item in enumerate(list(prediction)[:k], start=1):
        item = str(item)
        if item in seen:
            continue
        seen.add(item)
        if item in relevant:
            correct += 1
            ap += correct / rank
    return ap / min(len(relevant), k)


def map_at_k(predictions: dict, solution: dict, k: int = 100) -> float:
    """Mean Average Precision at ``k`` (Kaggle retrieval: k = 100).

    Args:
        predictions: query id -> ranked list of index ids (best first); absent / ``None`` / empty = no answer.
        solution: query id -> collection of relevant index ids, for every scored query.

    The mean runs over all queries of the solution (a query without prediction scores 0); predictions for
    ids outside the solution are ignored. Only the first ``k`` predictions count; a repeated id counts once.
    """
    if not solution:
        return 0.0
    total = 0.0
    for key, relevant in solution.items():
        pred = predictions.get(str(key)) or predictions.get(key) or []
        total += average_precision(pred, relevant, k)
    return total / len(solution)


def read_solution(path: str | Path, track: str) -> dict[str, dict[str, list[str]]]:
    """Read a Kaggle solution file into ``{"Public": {...}, "Private": {...}, "Ignored": {...}}``.

    Recognition files are ``id,landmarks,Usage`` (landmarks space-separated, empty for a non-landmark
    image); retrieval files ``id,images,Usage`` (index ids space-separated). Each usage maps test id ->
    list of true landmarks / relevant index ids. Raises :class:`KernelError` naming the file and line.
    """
    column = {"recognition": "landmarks", "retrieval": "images"}.get(track)
    if column is None:
        raise KernelError(f"unknown track '{track}' (expected recognition or retrieval)")
    path = Path(path)
    if not path.is_file():
        raise KernelError(f"{path}: solution file not found")
    out: dict[str, dict[str, list[str]]] = {u: {} for u in USAGES}
    with csv_text(path) as fh:
        _read_solution_rows(csv.DictReader(fh), column, path, out)
    return out


def _read_solution_rows(reader, column: str, path: Path, out: dict) -> None:
    fields = reader.fieldnames or []
    for need in ("id", column, "Usage"):
        if need not in fields:
            raise KernelError(f"{path}: column '{need}' is missing (header: {','.join(fields)})")
    seen: set[str] = set()
    for line, row in enumerate(reader, start=2):
        key = (row["id"] or "").strip()
        usage = (row["Usage"] or "").strip()
        if not key:
            raise KernelError(f"{path}:{line}: empty id")
        if key in seen:
            raise KernelError(f"{path}:{line}: id {key} appears twice")
        seen.add(key)
        if usage not in USAGES:
            raise KernelError(f"{path}:{line}: Usage '{usage}' is not one of {', '.join(USAGES)}")
        out[usage][key] = (row[column] or "").split()
