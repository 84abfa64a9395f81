"""``python -m kernel postprocess``: descriptor store -> checked ``submission.csv`` for one track."""
from __future__ import annotations

import json
import logging

from kernel import prefilter, submission
from kernel.memory import DEFAULT_MEMORY_GB, peak_rss_gib
from kernel.postprocess import pipeline

logger = logging.getLogger(__name__)

HELP = "re-rank / post-process the descriptors of a store and write a checked submission.csv"


def add_arguments(parser) -> None:
    from kernel.cli import number

    parser.add_argument("--track", required=True, choices=["recognition", "retrieval"])
    parser.add_argument("--store", required=True, help="descriptor store (STORE/<model>/<split>.npz + meta.json)")
    parser.add_argument("--train-labels", required=True, help="train.csv with columns id,landmark_id")
    parser.add_argument("--out", required=True, help="submission.csv to write (atomically)")
    parser.add_argument("--models", default=None, help="comma-separated model names (default: all for the track)")
    parser.add_argument("--rerank", default="soft", choices=list(pipeline.RERANKS),
                        help="retrieval re-ranking (default: soft, the 2021 solution)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--memory-gb", type=number(float, 0, exclusive_min=True), default=DEFAULT_MEMORY_GB,
                        help="memory budget of the process in GiB (default 10, the smallest Kaggle machine): "
                             "sizes the passes over the streamed train / index descriptors")
    parser.add_argument("--prepared", action="append", default=None, metavar="DIR",
                        help="folder of prepared artefacts (python -m kernel prepare); default STORE/prepared; "
                             "repeatable. Used only where their fingerprints match")
    parser.add_argument("--search-prefilter", default="auto", choices=list(prefilter.PREFILTERS),
                        help="CPU k-NN: score in bfloat16, rescore the candidates in float32 (same exact result; "
                             "auto: where this CPU has fast bfloat16 products; off: float32 throughout)")
    g = parser.add_argument_group("constants (docs/postprocessing.md#parameters; defaults are the papers' values)")
    g.add_argument("--knn-k", type=number(int, 1), default=None, help="neighbours of the k-NN label (3)")
    g.add_argument("--down-weight", type=number(float), default=None, help="soft re-ranking down-weight (0.1)")
    g.add_argument("--soft-keep", type=number(int, 1), default=None, help="soft re-ranking: index images kept per model (750)")
    g.add_argument("--n-results", type=number(int, 1, submission.MAX_IMAGES), default=None, help="retrieval answers per query (100)")
    g.add_argument("--insert-threshold", type=number(float), default=None, help="two-stage: conf(q)+conf(i) threshold (0.6)")
    g.add_argument("--bank-k-train", type=number(int, 1), default=None, help="recognition: B(t) over the 5 nearest non-landmarks")
    g.add_argument("--bank-k-query", type=number(int, 1), default=None, help="recognition: C(q) over the 10 nearest non-landmarks")
    g.add_argument("--conf-divisor", type=number(float, 0, exclusive_min=True), default=None,
                   help="retrieval k-NN confidence = similarity sum / this (default: --knn-k, our reading)")
    g.add_argument("--no-renormalize", action="store_true",
                   help="recognition: do not L2-normalise the concatenated family descriptor (our reading: do)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from kernel.cli import output_file

    output_file(args.out, "--out", inputs=[args.store, args.train_labels])
    progress = not args.no_progress
    if args.track == "retrieval":
        params = dict(knn_k=args.knn_k, down_weight=args.down_weight, soft_keep=args.soft_keep,
                      n_results=args.n_results, insert_threshold=args.insert_threshold,
                      conf_divisor=args.conf_divisor)
        preds = pipeline.retrieval_from_store(
            args.store, args.train_labels, models=args.models, rerank=args.rerank, device=args.device,
            progress=progress, prepared_dirs=args.prepared, memory_gb=args.memory_gb, prefilter=args.search_prefilter,
            **{k: v for k, v in params.items() if v is not None},
        )
    else:
        params = dict(knn_k=args.knn_k, bank_k_train=args.bank_k_train, bank_k_query=args.bank_k_query,
                      renormalize=False if args.no_renormalize else None)
        preds = pipeline.recognition_from_store(
            args.store, args.train_labels, models=args.models, device=args.device, progress=progress,
            prepared_dirs=args.prepared, memory_gb=args.memory_gb, prefilter=args.search_prefilter,
            **{k: v for k, v in params.items() if v is not None},
        )
    test_ids = list(preds)
    submission.write_submission(args.track, preds, test_ids, args.out)
    summary = submission.check_submission(args.track, args.out, test_ids=test_ids)
    peak = peak_rss_gib()
    (logger.warning if peak > args.memory_gb else logger.info)(
        "peak resident memory %.2f GiB (budget %g GiB)", peak, args.memory_gb)
    summary["peak_rss_gib"] = round(peak, 3)
    print(f"wrote {args.out}: {summary['rows']} rows, {summary['predicted']} with a prediction, {summary['empty']} empty")
    print(json.dumps(summary, sort_keys=True))
    return 0
