"""``python -m kernel prepare``: the test-independent post-processing work, once, offline.

Writes into ``STORE/prepared/`` (or ``--out``) the artefacts of :mod:`kernel.postprocess.prepared`:
recognition family descriptors of train and bank and B(t) of every train image; every retrieval model's
k-NN labels of the index images (and the two-stage ensemble's with ``--rerank two-stage``). ``postprocess``
and ``predict`` use each one only when its fingerprint matches their inputs, so a stale artefact is never
used silently. ``build_kernel.py --store`` ships them with the store.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from kernel.memory import DEFAULT_MEMORY_GB
from kernel import search
from kernel.errors import KernelError
from kernel.postprocess import pipeline as pp
from kernel.postprocess import prepared
from kernel.postprocess import reference as ref
from kernel.postprocess.knn import knn_labels
from kernel.rows import EnsembleRows

logger = logging.getLogger(__name__)

HELP = "compute the test-independent post-processing artefacts (k-NN labels of the index, B(t), family descriptors)"


def prepare_recognition(store_dir, reuse: ref.Reuse, p: dict, kw: dict, dtype=np.float32) -> list[Path]:
    """Family descriptors of train (and bank) written block by block, then B(t) (when the store has a bank)."""
    metas = pp.select_models(store_dir, "recognition")
    families: dict[str, list] = {}
    for meta in metas:
        families.setdefault(str(meta["family"]), []).append(pp.ModelSplits(store_dir, meta))
    groups = [families[f] for f in ref.family_order(families)]
    pp.require_splits([ms for g in groups for ms in g], ("train",))
    with_bank = all(ms.has("nonlandmark") for g in groups for ms in g)
    fam = {"renormalize": p["renormalize"]}
    written = []
    for split, name in (("train", "recognition_train.npz"), ("nonlandmark", "recognition_bank.npz")):
        if split == "nonlandmark" and not with_bank:
            continue
        rows = ref.family_rows(groups, split, p["renormalize"])
        fp = ref.recognition_fingerprint(f"recognition-{'train' if split == 'train' else 'bank'}", groups, (split,), fam)
        step = max(1, (256 << 20) // (rows.dim * 4))
        written.append(prepared.write(reuse.cache / name, fp, rows.ids, rows.dim, dtype,
                                      (b for _, _, b in rows.blocks(step))))
    if with_bank:
        ref.recognition_reference(groups, True, p, reuse, kw)  # B(t), saved to reuse.cache
        written.append(reuse.cache / "recognition_bias.npz")
    return written


def prepare_retrieval(store_dir, train_labels, reuse: ref.Reuse, p: dict, kw: dict, two_stage: bool) -> list[Path]:
    """Every retrieval model's k-NN labels of the index (and the two-stage ensemble's)."""
    splits = [pp.ModelSplits(store_dir, m) for m in pp.select_models(store_dir, "retrieval")]
    lacking = [ms.name for ms in splits if not (ms.has("index") and ms.has("train"))]
    if lacking:
        logger.warning("no index or train descriptors of %s: their index labels are computed at run time",
                       ", ".join(lacking))
        splits = [ms for ms in splits if ms.name not in lacking]
    if not splits:
        raise KernelError(f"{store_dir}: no retrieval model has both index and train descriptors")
    labels = pp.read_train_labels(train_labels)
    ctx = {"labels_fp": ref.labels_fingerprint(labels)}
    written = []
    for ms in splits:
        idx, train = ms.rows("index"), ms.rows("train")
        codes_of: dict = {}
        t_codes = ref.train_codes(train.ids, labels, ms.path("train"), codes_of)
        name = f"retrieval_{ms.name}.npz"
        ref.labels_artefact(reuse, name, ref.knn_fingerprint("retrieval-index-labels", [ms], p, ctx["labels_fp"]), idx.ids, codes_of,
                            lambda: knn_labels(idx, train, t_codes, k=p["knn_k"], divisor=p["conf_divisor"],
                                               desc=f"{ms.name} index labels", **kw))
        written.append(reuse.cache / name)
    if two_stage and lacking:
        logger.warning("two-stage labels not prepared: they need every model's index and train descriptors")
    elif two_stage:
        idx, train = EnsembleRows(ref.aligned_rows(splits, "index")), EnsembleRows(ref.aligned_rows(splits, "train"))
        codes_of = {}
        t_codes = ref.train_codes(train.ids, labels, splits[0].path("train"), codes_of)
        ref.labels_artefact(reuse, "two_stage.npz", ref.knn_fingerprint("two-stage-index-labels", splits, p, ctx["labels_fp"]), idx.ids,
                            codes_of, lambda: knn_labels(idx, train, t_codes, k=p["knn_k"], divisor=p["conf_divisor"],
                                                         desc="ensemble index labels", **kw))
        written.append(reuse.cache / "two_stage.npz")
    return written


def add_arguments(p) -> None:
    from kernel.cli import number

    p.add_argument("--store", required=True, help="descriptor store (STORE/<model>/<split>.npz + meta.json)")
    p.add_argument("--train-labels", default=None, help="train.csv (id,landmark_id): needed for the retrieval track")
    p.add_argument("--track", choices=["recognition", "retrieval", "both"], default="both")
    p.add_argument("--two-stage", action="store_true", help="also the two-stage ensemble's index labels")
    p.add_argument("--out", default=None, help="folder for the artefacts (default: STORE/prepared)")
    p.add_argument("--family-dtype", choices=["float32", "float16"], default="float32",
                   help="stored dtype of the recognition family descriptors (float32: exactly what the CPU "
                        "path computes; float16: half the disk, the searches then see float16-rounded descriptors)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--memory-gb", type=number(float, 0, exclusive_min=True), default=DEFAULT_MEMORY_GB,
                   help="process memory budget (sizes the passes)")
    g = p.add_argument_group("constants (must equal those postprocess / predict will use)")
    g.add_argument("--knn-k", type=number(int, 1), default=None)
    g.add_argument("--conf-divisor", type=number(float, 0, exclusive_min=True), default=None)
    g.add_argument("--bank-k-train", type=number(int, 1), default=None)
    g.add_argument("--no-renormalize", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    t0 = time.monotonic()
    from kernel.cli import output_dir

    out = output_dir(args.out if args.out is not None else prepared.prepared_dir(args.store), "--out")
    out.mkdir(parents=True, exist_ok=True)
    reuse = ref.Reuse(dirs=[], cache=out)  # recompute everything, write it to ``out``
    kw = dict(device=search.resolve_device(args.device), progress=not args.no_progress,
              pass_bytes=ref.pass_bytes(args.memory_gb))
    written = []
    if args.track in ("recognition", "both"):
        p = pp.resolve_params(pp.RECOGNITION_PARAMS, dict(bank_k_train=args.bank_k_train,
                                                  renormalize=False if args.no_renormalize else None))
        written += prepare_recognition(args.store, reuse, p, kw, np.dtype(args.family_dtype))
    if args.track in ("retrieval", "both"):
        if not args.train_labels:
            raise KernelError("--train-labels is needed for the retrieval track's index labels")
        p = pp.resolve_params(pp.RETRIEVAL_PARAMS, dict(knn_k=args.knn_k, conf_divisor=args.conf_divisor))
        written += prepare_retrieval(args.store, args.train_labels, reuse, p, kw, args.two_stage)
    print(f"prepared {len(written)} artefact(s) in {out} in {time.monotonic() - t0:.1f} s:")
    for w in written:
        print(f"  {w.name}  ({w.stat().st_size / 2**20:.1f} MiB)")
    return 0
