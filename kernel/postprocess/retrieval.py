"""Retrieval re-ranking on descriptor arrays (docs/postprocessing.md): none, soft up/down (2021), two-stage (2019).

Everything here works on positions: queries, index and train images are rows of arrays, landmarks are
integer codes (``-1`` = none, see :mod:`kernel.postprocess.knn`). :mod:`kernel.postprocess.pipeline`
maps store ids to rows and back.

* :func:`soft_scores` - one model's top-``keep`` index images of every query by the 2021 score
  ``cos + conf(i)`` (same k-NN label as the query) or ``cos - down * conf(i)`` (different label).
* :func:`sum_ensemble` - the 2021 ensemble: sum each index image's score over the models that kept it.
* :func:`ensemble_descriptors` - concatenated descriptors whose inner product is the models' mean cosine.
* :func:`two_stage` - the 2019 sort-step and insert-step on an initial ranking.

Every constant is a keyword argument with the paper's value as default.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from kernel import search

logger = logging.getLogger(__name__)

#: defaults (docs/postprocessing.md#parameters)
KNN_K = 3  # neighbours of the k-NN label
DOWN_WEIGHT = 0.1  # soft re-ranking: cos - 0.1 conf(i) when the labels differ
SOFT_KEEP = 750  # soft re-ranking: index images kept per query and model
N_RESULTS = 100  # answers per query (and the initial ranking of the two-stage re-ranking)
INSERT_THRESHOLD = 0.6  # two-stage insert-step: conf(q) + conf(i) must exceed it


class SoftScore:
    """``score_fn`` for :func:`kernel.search.topk`: the 2021 soft up/down score of one model.

    score(q, i) = cos(q, i) + conf(i) when label(q) == label(i) (and is not ``-1``), else
    cos(q, i) - down * conf(i). The down-weight is one subtraction of a per-column vector; the bonus
    touches only the (query, index) pairs that share a label, found from the index images grouped by
    label, so a block costs little more than its matrix product.
    """

    def __init__(self, query_labels, index_labels, index_conf, down: float = DOWN_WEIGHT, device=None):
        dev = search.resolve_device(device)
        self.q_labels = np.asarray(query_labels, dtype=np.int64)
        index_labels = np.asarray(index_labels, dtype=np.int64)
        conf = np.asarray(index_conf, dtype=np.float32)
        self.down = torch.as_tensor(-down * conf, device=dev)
        self.up = torch.as_tensor((1.0 + down) * conf, device=dev)  # undo the down-weight, add conf
        self.order = np.argsort(index_labels, kind="stable")
        self.sorted_labels = index_labels[self.order]
        self.device = dev
        self._rows: tuple[int, int] | None = None

    def _pairs(self, q0: int, q1: int) -> None:
        """All (query row, index column) pairs of a query chunk that share a label, sorted by column."""
        lab = self.q_labels[q0:q1]
        lo = np.searchsorted(self.sorted_labels, lab, side="left")
        hi = np.searchsorted(self.sorted_labels, lab, side="right")
        hi = np.where(lab >= 0, hi, lo)  # no label, no bonus
        counts = hi - lo
        rows = np.repeat(np.arange(q1 - q0), counts)
        starts = np.repeat(lo - np.cumsum(counts) + counts, counts)
        cols = self.order[starts + np.arange(counts.sum())]
        by_col = np.argsort(cols, kind="stable")
        self.rows, self.cols = rows[by_col], cols[by_col]
        self._rows = (q0, q1)

    def __call__(self, block: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
        if self._rows != (rows.start, rows.stop):
            self._pairs(rows.start, rows.stop)
        block.add_(self.down[cols])
        lo, hi = np.searchsorted(self.cols, [cols.start, cols.stop])
        if hi > lo:
            r = torch.as_tensor(self.rows[lo:hi], device=self.device)
            c = torch.as_tensor(self.cols[lo:hi], device=self.device)
            block.index_put_((r, c - cols.start), self.up[c], accumulate=True)
        return block


def soft_scores(
    queries,
    index,
    query_labels: np.ndarray,
    index_labels: np.ndarray,
    index_conf: np.ndarray,
    keep: int = SOFT_KEEP,
    down: float = DOWN_WEIGHT,
    **search_kwargs,
) -> tuple[np.ndarray, np.ndarray]:
    """One model's soft up/down scores: each query's top-``keep`` index rows by score (exact).

    Returns ``(scores, index_rows)`` of shape (Nq, min(keep, Ni)), best first, ties by ascending row.
    """
    fn = SoftScore(query_labels, index_labels, index_conf, down=down, device=search_kwargs.get("device"))
    return search.topk(queries, index, keep, score_fn=fn, **search_kwargs)


def sum_ensemble(
    per_model: list[tuple[np.ndarray, np.ndarray]],
    n_index: int,
    n_results: int = N_RESULTS,
    chunk: int = 2048,
    progress: bool = False,
) -> list[np.ndarray]:
    """The 2021 ensemble: sum every index image's score over the models that kept it, best ``n_results``.

    Args:
        per_model: one ``(scores, index_rows)`` pair per model, each (Nq, keep_m) over the same queries;
            rows of a query a model does not hold are ``-1`` (and add nothing).
        n_index: number of index rows (the id space of ``index_rows``).

    Returns:
        For every query, the index rows of its best ``n_results`` summed scores (fewer when fewer were
        kept by any model), best first; equal sums by ascending index row. Sums are float64, added in
        model order.
    """
    if not per_model:
        return []
    n_q = per_model[0][0].shape[0]
    out: list[np.ndarray] = []
    for q0 in tqdm(range(0, n_q, chunk), desc="ensemble", disable=not progress, leave=False):
        q1 = min(n_q, q0 + chunk)
        rows = torch.cat([torch.as_tensor(r[q0:q1], dtype=torch.int64) for _, r in per_model], dim=1)
        vals = torch.cat([torch.as_tensor(v[q0:q1], dtype=torch.float64) for v, _ in per_model], dim=1)
        valid = rows >= 0
        query = torch.arange(q1 - q0)[:, None].expand_as(rows)
        # one key per (query, index row): sorted unique keys group a query's rows, index ascending
        keys, inverse = torch.unique(query[valid] * (n_index + 1) + rows[valid], return_inverse=True)
        sums = torch.zeros(len(keys), dtype=torch.float64).index_add_(0, inverse, vals[valid])
        q_of, i_of = keys // (n_index + 1), keys % (n_index + 1)
        counts = torch.bincount(q_of, minlength=q1 - q0)
        width = max(int(counts.max()) if len(keys) else 0, 1)
        slot = torch.arange(len(keys)) - (torch.cumsum(counts, 0) - counts)[q_of]
        padded = torch.full((q1 - q0, width), -math.inf, dtype=torch.float64)
        index = torch.full((q1 - q0, width), n_index, dtype=torch.int64)
        padded[q_of, slot], index[q_of, slot] = sums, i_of
        _, best = search.select_topk(padded, index, min(n_results, width))
        for j, c in enumerate(counts.clamp(max=n_results).tolist()):
            out.append(best[j, :c].numpy())
    return out


def ensemble_descriptors(
    arrays: list[np.ndarray | None], present: list[np.ndarray] | None = None, dtype=torch.float32, device=None
) -> torch.Tensor:
    """Concatenate the models' L2-normalised descriptors so that the inner product is the mean cosine.

    Database side (``present`` None): every row has all ``M`` models, scaled by 1/sqrt(M) (docs/postprocessing.md#two-stage-re-ranking-2019: the
    ensemble descriptor). Query side: ``present[m]`` is a boolean mask of the rows model ``m`` holds
    (``arrays[m]`` has exactly those rows); a row's blocks are scaled by sqrt(M)/n(row), n = the models
    that hold it, and absent blocks are zero, so its inner product with a database row is the mean
    cosine over the models that hold it (equal to 1/sqrt(M) scaling when all do).
    """
    m = len(arrays)
    dims = [a.shape[1] for a in arrays]
    dev = search.resolve_device(device)
    n = present[0].shape[0] if present is not None else arrays[0].shape[0]
    out = torch.zeros(n, sum(dims), dtype=dtype, device=dev)
    if present is None:
        scale = torch.full((n,), 1.0 / math.sqrt(m), dtype=torch.float32)
    else:
        count = np.sum([p.astype(np.int64) for p in present], axis=0)
        scale = torch.as_tensor(math.sqrt(m) / np.maximum(count, 1), dtype=torch.float32)
    off = 0
    for j, a in enumerate(arrays):
        rows = slice(None) if present is None else torch.as_tensor(np.flatnonzero(present[j]))
        sc = scale if present is None else scale[rows]
        block = torch.as_tensor(a, dtype=torch.float32) * sc[:, None]
        if present is None:
            out[:, off : off + dims[j]] = block.to(dev, dtype)
        else:
            out[rows.to(dev), off : off + dims[j]] = block.to(dev, dtype)
        off += dims[j]
    return out


def two_stage(
    initial: np.ndarray,
    initial_counts: np.ndarray | None,
    query_labels: np.ndarray,
    query_conf: np.ndarray,
    index_labels: np.ndarray,
    index_conf: np.ndarray,
    n_results: int = N_RESULTS,
    threshold: float = INSERT_THRESHOLD,
) -> list[np.ndarray]:
    """The 2019 two-stage re-ranking of initial rankings.

    Args:
        initial: (Nq, K) index rows of each query's initial ranking (by ensemble cosine), best first.
        initial_counts: valid entries per row (``None`` = all K).
        query_labels, query_conf: k-NN label / confidence of every query.
        index_labels, index_conf: k-NN label / confidence of every index row.

    Sort-step: inside the initial ranking, the images whose label equals the query's go to the front,
    keeping their order, then the others in their order. Insert-step: index images with the query's label
    that are not in the initial ranking and have conf(q) + conf(i) > ``threshold`` are inserted right after
    those positives, by descending conf(i) (equal conf: ascending row). Cut to ``n_results``. A query
    without label (``-1``) keeps its initial ranking.
    """
    index_labels = np.asarray(index_labels, dtype=np.int64)
    index_conf = np.asarray(index_conf, dtype=np.float64)
    # index rows grouped by label, each group by conf descending, then row ascending
    order = np.lexsort((np.arange(len(index_labels)), -index_conf, index_labels))
    sorted_labels = index_labels[order]
    out: list[np.ndarray] = []
    for qi in range(initial.shape[0]):
        ranked = initial[qi, : initial.shape[1] if initial_counts is None else initial_counts[qi]]
        lab = int(query_labels[qi])
        if lab < 0:
            out.append(ranked[:n_results].copy())
            continue
        pos = index_labels[ranked] == lab
        lo, hi = np.searchsorted(sorted_labels, [lab, lab + 1])
        group = order[lo:hi]
        group = group[index_conf[group] + float(query_conf[qi]) > threshold]
        inserted = group[~np.isin(group, ranked)]
        out.append(np.concatenate([ranked[pos], inserted, ranked[~pos]])[:n_results])
    return out
