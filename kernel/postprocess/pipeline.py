"""Descriptor store -> predictions, for both tracks (used by ``postprocess`` and ``predict``).

Reads ``STORE/<model>/{test,index,train,nonlandmark}.npz`` model by model (only one model's train
descriptors are held at a time by the soft re-ranking), checks that ids and dimensions agree, and runs
:mod:`kernel.postprocess.retrieval` / :mod:`kernel.postprocess.recognition` on them.

The test ids of a store are the ids of the models' ``test.npz`` plus those of ``STORE/failures/test.csv``
(images that could not be decoded): every one of them gets a key in the returned predictions, with an
empty answer when no model holds its descriptor. A query that only some models hold (a model dropped
part-way) is answered by those models.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from kernel import search, store
from kernel.errors import KernelError
from kernel.postprocess import reference as ref
from kernel.postprocess import recognition as rec
from kernel.postprocess import retrieval as ret
from kernel.postprocess.knn import knn_labels
from kernel.rows import EnsembleRows, Rows, open_split
from kernel.views import view_path

logger = logging.getLogger(__name__)

RERANKS = ("soft", "two-stage", "none")

RETRIEVAL_PARAMS = {
    "knn_k": ret.KNN_K,
    "down_weight": ret.DOWN_WEIGHT,
    "soft_keep": ret.SOFT_KEEP,
    "n_results": ret.N_RESULTS,
    "insert_threshold": ret.INSERT_THRESHOLD,
    "conf_divisor": None,  # conf = best landmark's similarity sum / knn_k (our reading); a number overrides
}
RECOGNITION_PARAMS = {
    "knn_k": rec.KNN_K,
    "bank_k_train": rec.BANK_K_TRAIN,
    "bank_k_query": rec.BANK_K_QUERY,
    "clip": rec.CLIP,
    "renormalize": True,  # L2-normalise the concatenated family descriptor (our reading)
}


def resolve_params(defaults: dict, given: dict) -> dict:
    """``given`` (None values ignored) over ``defaults``; unknown names are an error."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise KernelError(f"unknown post-processing parameter(s): {', '.join(unknown)} (known: {', '.join(defaults)})")
    return {**defaults, **{k: v for k, v in given.items() if v is not None}}


# ---------------------------------------------------------------- inputs

def read_train_labels(train_labels) -> pd.Series:
    """``train.csv`` (``id,landmark_id``) or a DataFrame with those columns -> Series id -> landmark (str),
    Kaggle-integer landmark ids checked (:func:`kernel.labels.read_train_labels`)."""
    from kernel.labels import read_train_labels as read

    return read(train_labels)


def select_models(store_dir, track: str, models=None) -> list[dict]:
    """The models to use: ``models`` (names, in that order) or every model of the store that serves
    ``track`` (its meta.json ``tracks``, when present, must list the track). Returns their meta dicts."""
    available = store.list_models(store_dir)
    if models:
        names = [m.strip() for m in (models.split(",") if isinstance(models, str) else models) if m.strip()]
        missing = [m for m in names if m not in available]
        if missing:
            raise KernelError(
                f"{store_dir}: model(s) {', '.join(missing)} not in the store (has: {', '.join(available) or 'none'})"
            )
    else:
        names = []
        for m in available:
            tracks = store.read_meta(store_dir, m).get("tracks")
            if tracks is None or track in tracks:
                names.append(m)
    if not names:
        raise KernelError(f"{store_dir}: no model for the {track} track in the store")
    return [store.read_meta(store_dir, m) for m in names]


class ModelSplits:
    """Validated access to one model's splits (all must have the same width): ``load`` reads a small
    split (test) into memory, ``rows`` opens a database-side split to be read block by block."""

    def __init__(self, store_dir, meta: dict):
        self.store, self.meta, self.name = store_dir, meta, meta["name"]
        self.dim = meta.get("dim")

    def has(self, split: str) -> bool:
        return store.has_split(self.store, self.name, split)

    def load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        ids, emb = store.load_split(self.store, self.name, split, dtype=np.float32, dim=self.dim)
        self.dim = emb.shape[1]
        return ids, emb

    def rows(self, split: str) -> Rows:
        r = open_split(self.store, self.name, split, dim=self.dim)
        self.dim = r.dim
        return r

    def path(self, split: str) -> Path:
        """The split's descriptor file, or its view (:mod:`kernel.views`) when it has one."""
        view = view_path(self.store, self.name, split)
        return view if view.is_file() else store.split_path(self.store, self.name, split)


def require_splits(splits: list[ModelSplits], names: tuple[str, ...]) -> None:
    """Fail before any work when a model lacks a split the track needs."""
    for ms in splits:
        for split in names:
            if not ms.has(split):
                raise KernelError(f"{ms.path(split)}: missing split '{split}' for model '{ms.name}'")


def store_test_ids(store_dir, metas: list[dict]) -> list[str]:
    """Sorted union of the models' test ids and the ids of ``STORE/failures/test.csv``."""
    ids: set[str] = set(store.read_failures(store_dir, "test"))
    for meta in metas:
        path = store.split_path(store_dir, meta["name"], "test")
        if not path.is_file():
            raise KernelError(f"{path}: missing split 'test' for model '{meta['name']}'")
        ids.update(store.read_ids(path).tolist())
    return sorted(ids)


def _query_rows(test_ids: list[str], ids: np.ndarray) -> np.ndarray:
    """Positions of a model's test ids among all test ids."""
    return pd.Index(test_ids).get_indexer(ids)


# ---------------------------------------------------------------- retrieval

def retrieval_from_store(
    store_dir,
    train_labels,
    models=None,
    rerank: str = "soft",
    device=None,
    progress: bool = True,
    prepared_dirs=None,
    cache_dir=None,
    memory_gb: float | None = None,
    prefilter: str = "auto",
    **params,
) -> dict[str, list[str]]:
    """Retrieval answers for every test id of the store: query id -> up to ``n_results`` index ids.

    ``rerank``: ``soft`` (2021, default), ``two-stage`` (2019) or ``none`` (ensemble cosine). ``params``:
    ``knn_k`` (3), ``down_weight`` (0.1), ``soft_keep`` (750), ``n_results`` (100),
    ``insert_threshold`` (0.6), ``conf_divisor`` (None = ``knn_k``). Splits used: ``test``, ``index``,
    ``train`` of every model; ``index`` and ``train`` are streamed from disk (``memory_gb`` sizes the
    passes, :func:`kernel.postprocess.reference.pass_bytes`). The index images' k-NN labels come from a prepared artefact of
    ``prepared_dirs`` (default ``STORE/prepared``) when its fingerprint matches, else are computed (and
    saved in ``cache_dir`` when given). ``prefilter``: every search's ``prefilter``
    (:func:`kernel.search.topk`: ``auto``, ``bf16`` or ``off``).
    """
    if rerank not in RERANKS:
        raise KernelError(f"unknown re-ranking '{rerank}' (choose from {', '.join(RERANKS)})")
    p = resolve_params(RETRIEVAL_PARAMS, params)
    dev = search.resolve_device(device)
    metas = select_models(store_dir, "retrieval", models)
    labels = read_train_labels(train_labels) if rerank != "none" else None
    test_ids = store_test_ids(store_dir, metas)
    splits = [ModelSplits(store_dir, m) for m in metas]
    require_splits(splits, ("test", "index") if rerank == "none" else ("test", "index", "train"))
    logger.info(
        "retrieval (%s re-ranking) with %d model(s) on %s: %d test ids",
        rerank, len(metas), dev, len(test_ids),
    )
    ctx = dict(reuse=ref.Reuse.of(store_dir, prepared_dirs, cache_dir), labels=labels,
               labels_fp=ref.labels_fingerprint(labels),
               kw=dict(device=dev, progress=progress, pass_bytes=ref.pass_bytes(memory_gb), prefilter=prefilter))
    if rerank == "soft":
        index_ids, ranked = _soft(splits, test_ids, p, ctx)
    else:
        index_ids, ranked = _concatenated(splits, test_ids, rerank, p, ctx)
    return {q: [str(index_ids[j]) for j in rows] for q, rows in zip(test_ids, ranked)}


def _soft(splits, test_ids, p, ctx):
    """2021 soft up/down re-ranking, model by model, then the summed ensemble."""
    index_pos: dict[str, int] = {}  # global index rows: first model's order, new ids appended
    per_model = []
    codes_of: dict = {}
    n_q, kw = len(test_ids), ctx["kw"]
    for ms in splits:
        q_ids, q = ms.load("test")
        idx, train = ms.rows("index"), ms.rows("train")
        t_codes = ref.train_codes(train.ids, ctx["labels"], ms.path("train"), codes_of)
        logger.info("%s: %d queries, %d index, %d train descriptors", ms.name, len(q), len(idx), len(train))
        q_lab, _ = knn_labels(q, train, t_codes, k=p["knn_k"], divisor=p["conf_divisor"],
                              desc=f"{ms.name} test labels", **kw)
        i_lab, i_conf = ref.labels_artefact(
            ctx["reuse"], f"retrieval_{ms.name}.npz", ref.knn_fingerprint("retrieval-index-labels", [ms], p, ctx["labels_fp"]), idx.ids,
            codes_of, lambda: knn_labels(idx, train, t_codes, k=p["knn_k"], divisor=p["conf_divisor"],
                                         desc=f"{ms.name} index labels", **kw))
        scores, rows = ret.soft_scores(
            q, idx, q_lab, i_lab, i_conf, keep=p["soft_keep"], down=p["down_weight"], desc=f"{ms.name} soft", **kw
        )
        glob = np.asarray([index_pos.setdefault(str(i), len(index_pos)) for i in idx.ids], dtype=np.int64)
        if ms is splits[0]:
            n_index_first = len(index_pos)
        full_s = np.zeros((n_q, scores.shape[1]), np.float32)
        full_r = np.full((n_q, scores.shape[1]), -1, np.int32)
        qr = _query_rows(test_ids, q_ids)
        full_s[qr], full_r[qr] = scores, glob[rows]
        per_model.append((full_s, full_r))
    if len(index_pos) != n_index_first:
        logger.warning(
            "the models' index splits hold different ids (%d in the first, %d in all): each model scores "
            "the ids it holds", n_index_first, len(index_pos),
        )
    ranked = ret.sum_ensemble(per_model, len(index_pos), n_results=p["n_results"], progress=kw["progress"])
    index_ids = np.asarray(list(index_pos), dtype=object)
    return index_ids, ranked


def _ensemble_queries(splits, test_ids, dtype, dev):
    """Concatenated query descriptors (mean cosine over the models holding each query) + who has one."""
    arrays, present = [], []
    for ms in splits:
        ids, emb = ms.load("test")
        rows = _query_rows(test_ids, ids)
        order = np.argsort(rows)
        mask = np.zeros(len(test_ids), bool)
        mask[rows] = True
        arrays.append(emb[order])
        present.append(mask)
    have = np.any(present, axis=0)
    return have, ret.ensemble_descriptors(arrays, present, dtype=dtype, device=dev)


def _concatenated(splits, test_ids, rerank, p, ctx):
    """Ensemble cosine ranking (``none``) and the 2019 two-stage re-ranking on concatenated descriptors."""
    kw = ctx["kw"]
    dev = kw["device"]
    have, q = _ensemble_queries(splits, test_ids, search.compute_dtype(dev), dev)
    idx = EnsembleRows(ref.aligned_rows(splits, "index"))
    _, initial = search.topk(q, idx, p["n_results"], desc="ensemble cosine", **kw)
    if rerank == "two-stage":
        train = EnsembleRows(ref.aligned_rows(splits, "train"))
        codes_of: dict = {}
        t_codes = ref.train_codes(train.ids, ctx["labels"], splits[0].path("train"), codes_of)
        q_lab, q_conf = knn_labels(q, train, t_codes, k=p["knn_k"], divisor=p["conf_divisor"],
                                   desc="test labels", **kw)
        i_lab, i_conf = ref.labels_artefact(
            ctx["reuse"], "two_stage.npz", ref.knn_fingerprint("two-stage-index-labels", splits, p, ctx["labels_fp"]), idx.ids, codes_of,
            lambda: knn_labels(idx, train, t_codes, k=p["knn_k"], divisor=p["conf_divisor"],
                               desc="index labels", **kw))
        ranked = ret.two_stage(
            initial, None, q_lab, q_conf, i_lab, i_conf, n_results=p["n_results"], threshold=p["insert_threshold"]
        )
    else:
        ranked = list(initial)
    ranked = [r if h else r[:0] for r, h in zip(ranked, have)]
    return idx.ids, ranked


# ---------------------------------------------------------------- recognition

def recognition_from_store(
    store_dir,
    train_labels,
    models=None,
    device=None,
    progress: bool = True,
    prepared_dirs=None,
    cache_dir=None,
    memory_gb: float | None = None,
    prefilter: str = "auto",
    **params,
) -> dict[str, tuple[str, float] | None]:
    """Recognition answers for every test id of the store: id -> (landmark_id, confidence) or ``None``.

    Family-averaged descriptors of ``test``, ``train`` and, when every model has it, ``nonlandmark``
    (the non-landmark bank); without a bank it is plain k-NN voting. ``params``: ``knn_k`` (3),
    ``bank_k_train`` (5), ``bank_k_query`` (10), ``clip`` ((0, 1)), ``renormalize`` (True). The train and
    bank family descriptors are computed block by block from the models' splits (never all in memory)
    or read from prepared artefacts, as is B(t) (see :func:`retrieval_from_store` for ``prepared_dirs``,
    ``cache_dir``, ``memory_gb``, ``prefilter``).
    """
    p = resolve_params(RECOGNITION_PARAMS, params)
    dev = search.resolve_device(device)
    metas = select_models(store_dir, "recognition", models)
    labels = read_train_labels(train_labels)
    test_ids = store_test_ids(store_dir, metas)
    families: dict[str, list[ModelSplits]] = {}
    for meta in metas:
        families.setdefault(str(meta["family"]), []).append(ModelSplits(store_dir, meta))
    order = ref.family_order(families)
    groups = [families[f] for f in order]
    require_splits([ms for g in groups for ms in g], ("test", "train"))
    logger.info(
        "recognition with %d model(s) in %d famil%s (%s) on %s: %d test ids",
        len(metas), len(order), "y" if len(order) == 1 else "ies",
        ", ".join(f"{f}: {len(families[f])}" for f in order), dev, len(test_ids),
    )
    with_bank = [ms.has("nonlandmark") for g in groups for ms in g]
    if any(with_bank) and not all(with_bank):
        lacking = next(ms for g in groups for ms in g if not ms.has("nonlandmark"))
        raise KernelError(f"{lacking.path('nonlandmark')}: missing split 'nonlandmark' (other models have one)")
    kw = dict(device=dev, progress=progress, pass_bytes=ref.pass_bytes(memory_gb), prefilter=prefilter)
    have, test = _family_queries(groups, test_ids, p["renormalize"], dev)
    train, bank, bias = ref.recognition_reference(groups, all(with_bank), p, ref.Reuse.of(store_dir, prepared_dirs, cache_dir), kw)
    codes_of: dict = {}
    t_codes = ref.train_codes(train.ids, labels, groups[0][0].path("train"), codes_of)
    codes, conf = rec.recognize(
        test, train, t_codes, bank, k=p["knn_k"], bank_k_train=p["bank_k_train"], bank_k_query=p["bank_k_query"],
        clip=tuple(p["clip"]), train_bias=bias, **kw,
    )
    landmark_of = ref.landmarks_of(np.arange(len(codes_of)), codes_of)
    out: dict[str, tuple[str, float] | None] = {}
    for j, q in enumerate(test_ids):
        out[q] = (str(landmark_of[codes[j]]), float(conf[j])) if have[j] and codes[j] >= 0 else None
    return out


def _family_queries(groups, test_ids, normalize: bool, dev):
    """Family descriptors of the test images (in memory: the test set is small) + who has one."""
    arrays, present = [], []
    for g in groups:
        arrays.append([])
        present.append([])
        for ms in g:
            ids, emb = ms.load("test")
            rows = _query_rows(test_ids, ids)
            mask = np.zeros(len(test_ids), bool)
            mask[rows] = True
            arrays[-1].append(emb[np.argsort(rows)])
            present[-1].append(mask)
    ref.check_family_dims(groups, [[a.shape[1] for a in fam] for fam in arrays])
    have = np.any([m for fam in present for m in fam], axis=0)
    test = rec.family_descriptors(arrays, present, n=len(test_ids), dtype=search.compute_dtype(dev), device=dev,
                                  normalize=normalize)
    return have, test

