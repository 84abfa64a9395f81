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
from kernel.postprocess import recognition as rec
from kernel.postprocess import retrieval as ret
from kernel.postprocess.knn import knn_labels

logger = logging.getLogger(__name__)

RERANKS = ("soft", "two-stage", "none")
FAMILY_ORDER = ("dolg", "hybrid", "effnet")

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


def _params(defaults: dict, given: dict) -> dict:
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
    """Lazy, validated access to one model's splits (all must have the same width)."""

    def __init__(self, store_dir, meta: dict):
        self.store, self.meta, self.name = store_dir, meta, meta["name"]
        self.dim = meta.get("dim")

    def has(self, split: str) -> bool:
        return store.has_split(self.store, self.name, split)

    def load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        ids, emb = store.load_split(self.store, self.name, split, dtype=np.float32, dim=self.dim)
        self.dim = emb.shape[1]
        return ids, emb

    def path(self, split: str) -> Path:
        return store.split_path(self.store, self.name, split)


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
        with np.load(path, allow_pickle=False) as z:
            ids.update(z["ids"].astype(str).tolist())
    return sorted(ids)


def _align(ids: np.ndarray, emb: np.ndarray, ref: np.ndarray, path: Path, ref_path: Path) -> np.ndarray:
    """Rows of ``emb`` in the order of ``ref``; the id sets must be equal."""
    if len(ids) == len(ref) and np.array_equal(ids, ref):
        return emb
    pos = pd.Index(ids).get_indexer(ref)
    if len(ids) != len(ref) or (pos < 0).any():
        extra = np.setdiff1d(ids, ref)
        missing = np.setdiff1d(ref, ids)
        first = f"e.g. {missing[0]} missing" if len(missing) else f"e.g. {extra[0]} extra"
        raise KernelError(
            f"{path}: ids do not match {ref_path} ({len(missing)} missing, {len(extra)} extra; {first})"
        )
    return emb[pos]


def _train_codes(ids: np.ndarray, labels: pd.Series, path: Path, codes_of: dict) -> np.ndarray:
    """Integer landmark codes of train ids (codes shared across models through ``codes_of``)."""
    lab = labels.reindex(ids)
    if lab.isna().any():
        missing = ids[lab.isna().to_numpy()]
        raise KernelError(f"{path}: {len(missing)} train ids have no landmark_id in the train labels (first: {missing[0]})")
    out = np.empty(len(ids), np.int64)
    for j, v in enumerate(lab.to_numpy()):
        out[j] = codes_of.setdefault(v, len(codes_of))
    return out


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
    **params,
) -> dict[str, list[str]]:
    """Retrieval answers for every test id of the store: query id -> up to ``n_results`` index ids.

    ``rerank``: ``soft`` (2021, default), ``two-stage`` (2019) or ``none`` (ensemble cosine). ``params``:
    ``knn_k`` (3), ``down_weight`` (0.1), ``soft_keep`` (750), ``n_results`` (100),
    ``insert_threshold`` (0.6), ``conf_divisor`` (None = ``knn_k``). Splits used: ``test``, ``index``,
    ``train`` of every model.
    """
    if rerank not in RERANKS:
        raise KernelError(f"unknown re-ranking '{rerank}' (choose from {', '.join(RERANKS)})")
    p = _params(RETRIEVAL_PARAMS, params)
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
    if rerank == "soft":
        index_ids, ranked = _soft(splits, labels, test_ids, p, dev, progress)
    else:
        index_ids, ranked = _concatenated(splits, labels, test_ids, rerank, p, dev, progress)
    return {q: [str(index_ids[j]) for j in rows] for q, rows in zip(test_ids, ranked)}


def _soft(splits, labels, test_ids, p, dev, progress):
    """2021 soft up/down re-ranking, model by model, then the summed ensemble."""
    index_pos: dict[str, int] = {}  # global index rows: first model's order, new ids appended
    per_model = []
    codes_of: dict = {}
    n_q = len(test_ids)
    for ms in splits:
        q_ids, q = ms.load("test")
        i_ids, idx = ms.load("index")
        t_ids, train = ms.load("train")
        t_codes = _train_codes(t_ids, labels, ms.path("train"), codes_of)
        logger.info("%s: %d queries, %d index, %d train descriptors", ms.name, len(q), len(idx), len(train))
        kw = dict(device=dev, progress=progress)
        train = search.to_device(train, dev, search.compute_dtype(dev))  # moved once, searched twice
        q_lab, _ = knn_labels(q, train, t_codes, k=p["knn_k"], divisor=p["conf_divisor"],
                              desc=f"{ms.name} test labels", **kw)
        i_lab, i_conf = knn_labels(idx, train, t_codes, k=p["knn_k"], divisor=p["conf_divisor"],
                                   desc=f"{ms.name} index labels", **kw)
        del train
        scores, rows = ret.soft_scores(
            q, idx, q_lab, i_lab, i_conf, keep=p["soft_keep"], down=p["down_weight"], desc=f"{ms.name} soft", **kw
        )
        glob = np.asarray([index_pos.setdefault(str(i), len(index_pos)) for i in i_ids], dtype=np.int64)
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
    ranked = ret.sum_ensemble(per_model, len(index_pos), n_results=p["n_results"], progress=progress)
    index_ids = np.asarray(list(index_pos), dtype=object)
    return index_ids, ranked


def _ensemble_side(splits, split: str, dtype, dev):
    """Concatenated database-side descriptors of ``split`` (ids aligned to the first model)."""
    ref_ids, ref_path, arrays = None, None, []
    for ms in splits:
        ids, emb = ms.load(split)
        if ref_ids is None:
            ref_ids, ref_path = ids, ms.path(split)
        arrays.append(_align(ids, emb, ref_ids, ms.path(split), ref_path))
    return ref_ids, ret.ensemble_descriptors(arrays, dtype=dtype, device=dev)


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


def _concatenated(splits, labels, test_ids, rerank, p, dev, progress):
    """Ensemble cosine ranking (``none``) and the 2019 two-stage re-ranking on concatenated descriptors."""
    dt = search.compute_dtype(dev)
    have, q = _ensemble_queries(splits, test_ids, dt, dev)
    index_ids, idx = _ensemble_side(splits, "index", dt, dev)
    kw = dict(device=dev, progress=progress)
    k0 = p["n_results"]
    _, initial = search.topk(q, idx, k0, desc="ensemble cosine", **kw)
    if rerank == "two-stage":
        t_ids, train = _ensemble_side(splits, "train", dt, dev)
        t_codes = _train_codes(t_ids, labels, splits[0].path("train"), {})
        q_lab, q_conf = knn_labels(q, train, t_codes, k=p["knn_k"], divisor=p["conf_divisor"],
                                   desc="test labels", **kw)
        i_lab, i_conf = knn_labels(idx, train, t_codes, k=p["knn_k"], divisor=p["conf_divisor"],
                                   desc="index labels", **kw)
        del train
        ranked = ret.two_stage(
            initial, None, q_lab, q_conf, i_lab, i_conf, n_results=p["n_results"], threshold=p["insert_threshold"]
        )
    else:
        ranked = list(initial)
    ranked = [r if h else r[:0] for r, h in zip(ranked, have)]
    return index_ids, ranked


# ---------------------------------------------------------------- recognition

def _family_order(families: dict) -> list[str]:
    known = [f for f in FAMILY_ORDER if f in families]
    return known + sorted(f for f in families if f not in FAMILY_ORDER)


def recognition_from_store(
    store_dir,
    train_labels,
    models=None,
    device=None,
    progress: bool = True,
    **params,
) -> dict[str, tuple[str, float] | None]:
    """Recognition answers for every test id of the store: id -> (landmark_id, confidence) or ``None``.

    Family-averaged descriptors of ``test``, ``train`` and, when every model has it, ``nonlandmark``
    (the non-landmark bank); without a bank it is plain k-NN voting. ``params``: ``knn_k`` (3),
    ``bank_k_train`` (5), ``bank_k_query`` (10), ``clip`` ((0, 1)), ``renormalize`` (True).
    """
    p = _params(RECOGNITION_PARAMS, params)
    dev = search.resolve_device(device)
    dt = search.compute_dtype(dev)
    metas = select_models(store_dir, "recognition", models)
    labels = read_train_labels(train_labels)
    test_ids = store_test_ids(store_dir, metas)
    families: dict[str, list[ModelSplits]] = {}
    for meta in metas:
        families.setdefault(str(meta["family"]), []).append(ModelSplits(store_dir, meta))
    order = _family_order(families)
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

    # test side: per model, its rows among all test ids
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
    _check_family_dims(groups, arrays)
    have = np.any([m for fam in present for m in fam], axis=0)
    test = rec.family_descriptors(arrays, present, n=len(test_ids), dtype=dt, device=dev,
                                  normalize=p["renormalize"])
    del arrays
    t_ids, train = _family_side(groups, "train", dt, dev, p["renormalize"])
    codes_of: dict = {}
    t_codes = _train_codes(t_ids, labels, groups[0][0].path("train"), codes_of)
    bank = _family_side(groups, "nonlandmark", dt, dev, p["renormalize"])[1] if all(with_bank) else None
    codes, conf = rec.recognize(
        test, train, t_codes, bank, k=p["knn_k"], bank_k_train=p["bank_k_train"],
        bank_k_query=p["bank_k_query"], clip=tuple(p["clip"]), progress=progress, device=dev,
    )
    landmark_of = np.empty(len(codes_of), dtype=object)
    for v, c in codes_of.items():
        landmark_of[c] = v
    out: dict[str, tuple[str, float] | None] = {}
    for j, q in enumerate(test_ids):
        out[q] = (str(landmark_of[codes[j]]), float(conf[j])) if have[j] and codes[j] >= 0 else None
    return out


def _check_family_dims(groups, arrays) -> None:
    for g, fam in zip(groups, arrays):
        dims = {ms.name: a.shape[1] for ms, a in zip(g, fam)}
        if len(set(dims.values())) > 1:
            raise KernelError(
                f"models of family '{g[0].meta['family']}' have different descriptor widths: "
                + ", ".join(f"{k} {v}-d" for k, v in dims.items())
            )


def _family_side(groups, split: str, dt, dev, normalize: bool = True):
    """Family descriptors of a database-side split (every model must hold the same ids)."""
    ref_ids, ref_path, arrays = None, None, []
    for g in groups:
        arrays.append([])
        for ms in g:
            ids, emb = ms.load(split)
            if ref_ids is None:
                ref_ids, ref_path = ids, ms.path(split)
            arrays[-1].append(_align(ids, emb, ref_ids, ms.path(split), ref_path))
    _check_family_dims(groups, arrays)
    return ref_ids, rec.family_descriptors(arrays, dtype=dt, device=dev, normalize=normalize)
