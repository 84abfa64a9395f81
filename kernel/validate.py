"""``python -m kernel validate``: check a submission against a Kaggle solution file and score it.

Prints a human summary and, as its last line, a JSON object whose ``score`` is the metric over all
scored (Public + Private) test images: GAP for recognition, mAP@100 for retrieval.
"""
from __future__ import annotations

import json
import logging

from kernel import metrics, submission

logger = logging.getLogger(__name__)

HELP = "check a submission.csv against a Kaggle solution file and print its GAP / mAP@100"
METRIC = {"recognition": "GAP", "retrieval": "mAP@100"}


def add_arguments(parser) -> None:
    parser.add_argument("--track", required=True, choices=["recognition", "retrieval"])
    parser.add_argument("--submission", required=True, help="submission.csv to check")
    parser.add_argument("--solution", required=True,
                        help="Kaggle solution file: id,landmarks,Usage (recognition) or id,images,Usage (retrieval)")
    parser.add_argument("--index", default=None,
                        help="retrieval: the index images (competition folder, folder of images or CSV id,path); "
                        "answers naming another id are refused")


def score(track: str, predictions: dict, solution: dict) -> float:
    if track == "recognition":
        return metrics.gap(predictions, solution)
    return metrics.map_at_k(predictions, solution, k=submission.MAX_IMAGES)


def validate(track: str, submission_path, solution_path, index=None) -> dict:
    """Check the submission covers exactly the solution's ids in a valid format (retrieval answers: ids of
    ``index`` when given), then score it. Ids are compared as text, as Kaggle compares them."""
    sol = metrics.read_solution(solution_path, track)
    all_ids = [i for usage in sol.values() for i in usage]
    index_ids = None
    if index is not None and track == "retrieval":
        from kernel.data.sources import open_source

        index_ids = [r.id for r in open_source(index, "index")]
    summary = submission.check_submission(track, submission_path, test_ids=all_ids, index_ids=index_ids)
    preds = submission.read_submission(track, submission_path)
    scored = {**sol["Public"], **sol["Private"]}
    result = {
        "metric": METRIC[track],
        "score": score(track, preds, scored),
        "public": score(track, preds, sol["Public"]) if sol["Public"] else None,
        "private": score(track, preds, sol["Private"]) if sol["Private"] else None,
        "scored": len(scored),
        "ignored": len(sol["Ignored"]),
        **{k: v for k, v in summary.items() if k != "track"},
    }
    if track == "recognition":
        result["landmark_images"] = sum(1 for v in scored.values() if v)
    return result


def run(args) -> int:
    r = validate(args.track, args.submission, args.solution, args.index)
    print(f"{args.submission}: valid {args.track} submission, {r['rows']} rows "
          f"({r['predicted']} with a prediction, {r['empty']} empty)")
    print(f"scored test images: {r['scored']} (ignored: {r['ignored']})")
    for part in ("public", "private"):
        if r[part] is not None:
            print(f"{r['metric']} {part}: {r[part]:.6f}")
    print(f"{r['metric']} (public + private): {r['score']:.6f}")
    print(json.dumps(r, sort_keys=True))
    return 0
