"""Shipped recognition artefacts reused row by row when the run's train set differs from the shipped one.

On the scored rerun ``predict`` reads the train split through views (:mod:`kernel.views`): the shipped rows
without the images gone, then the images added at run time. The prepared family descriptors
(``recognition_train.npz``) and B(t) (``recognition_bias.npz``) of the shipped train set no longer match as a
whole, but each of their rows depends on that image alone (its models' descriptors; its similarity to the
non-landmark bank). So the rows of the images still present are taken from the shipped artefacts, and only the
added images' rows are computed: at 1.58 M train images that saves re-reading every model's train descriptors
(13 GB) and the bank search of every train image. Artefacts that depend on the whole train set (retrieval's index
k-NN labels) are recomputed instead (their fingerprint differs; the log says so).
"""
from __future__ import annotations

import logging

import numpy as np

from kernel.postprocess import prepared
from kernel.postprocess import recognition as rec
from kernel.rows import FamilyRows, Rows, SplitRows, ViewRows, stacked_block
from kernel.views import View, read_view

logger = logging.getLogger(__name__)


class StackedRows(Rows):
    """Several :class:`Rows` of the same width one after another (ids concatenated, read in order)."""

    def __init__(self, parts: list[Rows], name: str = "rows"):
        self.parts, self.name = parts, name
        self.ids = np.concatenate([p.ids for p in parts])
        self.dim = parts[0].dim
        self.starts = np.cumsum([0] + [len(p) for p in parts])

    def block(self, r0: int, r1: int) -> np.ndarray:
        return stacked_block(self.parts, self.starts, self.dim, r0, r1)


def _views(groups, split: str) -> list[View] | None:
    """Every model's view of ``split``, when all have one and all leave out the same shipped ids."""
    views = [read_view(ms.store, ms.name, split) for g in groups for ms in g]
    if any(v is None for v in views) or len({v.exclude for v in views}) != 1:
        return None
    return views


def shipped_fingerprint(kind: str, groups, views: list[View], params: dict) -> dict:
    """The fingerprint an artefact computed from the shipped files the views read would carry."""
    models = []
    for (ms, view) in zip([ms for g in groups for ms in g], views):
        fp = prepared.model_fingerprint(ms.meta, ms.store, ())
        fp["splits"] = {"train": prepared.split_fingerprint(view.base)}
        models.append(fp)
    return prepared.fingerprint(kind, models, params)


def _added_family_rows(groups, views: list[View], normalize: bool) -> FamilyRows | None:
    """Family descriptor rows of the images the views add (the ids every model holds), or None."""
    if any(v.added is None for v in views):
        return None
    flat = [ViewRows(View(v.path, v.added, v.added_exclude)) for v in views]
    flat = [flat[0]] + [r.aligned_to(flat[0].ids, str(flat[0].path)) for r in flat[1:]]
    if not len(flat[0]):
        return None
    it = iter(flat)
    return FamilyRows([[next(it) for _ in g] for g in groups], normalize=normalize, name="added family descriptors")


def reuse_train(groups, p: dict, reuse, bank: Rows, kw: dict):
    """``(train rows, B(t))`` from the shipped artefacts' rows of the images still present plus the added images'
    rows computed here; None when the shipped artefacts do not fit the views (then everything is computed)."""
    views = _views(groups, "train")
    if views is None:
        return None
    fam = {"renormalize": p["renormalize"]}
    train_path = reuse.find("recognition_train.npz", lambda: shipped_fingerprint("recognition-train", groups,
                                                                                  views, fam))
    bias_fp = {**fam, "bank_k_train": p["bank_k_train"]}
    bias_path = train_path and reuse.find("recognition_bias.npz", lambda: _bias_fingerprint(groups, views, bias_fp))
    if not bias_path:
        return None
    shipped = SplitRows(train_path)
    ids, bias = prepared.load_arrays(bias_path, "ids", "bias")
    if not np.array_equal(ids.astype(str), shipped.ids):
        return None
    keep = ~np.isin(shipped.ids, np.asarray(sorted(views[0].exclude), dtype=str))
    parts, biases = [shipped.subset(keep)], [bias[keep].astype(np.float32)]
    added = _added_family_rows(groups, views, p["renormalize"])
    if added is not None:
        parts.append(added)
        biases.append(rec.bank_similarity(added, bank, p["bank_k_train"], desc="B(added)", **kw))
    logger.info("family descriptors and B(t): %d train rows reused from %s, %d computed here", int(keep.sum()),
                train_path.parent, len(added) if added is not None else 0)
    return StackedRows(parts, name="train family descriptors"), np.concatenate(biases)


def _bias_fingerprint(groups, views: list[View], params: dict) -> dict:
    """B(t)'s shipped fingerprint: the train splits the views' base files, the bank as it is."""
    fp = shipped_fingerprint("recognition-bias", groups, views, params)
    for model, ms in zip(fp["models"], [ms for g in groups for ms in g]):
        model["splits"]["nonlandmark"] = prepared.stored_split_fingerprint(ms.store, ms.name, "nonlandmark")
    return prepared.fingerprint("recognition-bias", fp["models"], params)
