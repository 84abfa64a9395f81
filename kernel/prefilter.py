"""The bfloat16 prefilter (CPU): an exact float32 search at the speed of a bfloat16 matrix product.

CPUs with native bfloat16 dot products (AVX512-BF16, AMX) multiply bfloat16 matrices 2-4x faster than
float32 ones. The prefilter scores every pair in bfloat16, keeps per query every database row that a
rigorous error bound says *could* be in the float32 top k (a band of a few k rows), and rescores only
those in float32, so :func:`kernel.search.topk` returns the same exact float32 answer. The bound::

  q' = bf16(q), d' = bf16(d); s_acc = float32 accumulation of q'.d'; s = bf16(s_acc) (the block);
  f = float32 rescoring of q.d (the value returned).
  |s_acc - f| <= E_q = |q'| max|d - d'| + |q - q'| max|d| + g (|q'| max|d'| + |q| max|d|),
  g = 2 n 2^-24 (twice the classic bound of any float32 summation order of n products);
  |s - s_acc| <= c |s|, c = u / (1 - u), u = 2^-8 (round to nearest bfloat16).

So f lies in [lo(s) - E, hi(s) + E] with lo(x) = x - c|x|, hi(x) = x + c|x|. If T is the k-th largest
block score of a query so far, k rows have f >= lo(T) - E, so the final k-th float32 score is at least
that, and a row can only enter the top k if hi(s) + E >= lo(T) - E, i.e. s >= hi^-1(lo(T) - 2E).
Keeping exactly those rows and ranking them by f gives the exact float32 top k, ties included. The bound
is checked once against this CPU's actual bfloat16 products (:func:`bf16_prefilter_available`), and
``"auto"`` only uses the prefilter where the bfloat16 product is really faster (:func:`use_prefilter`).
"""
from __future__ import annotations

import logging
import math
import time
import warnings

import torch

from kernel.selection import entries_above, pad_rows, segment_max, segment_width, select_topk

logger = logging.getLogger(__name__)

PREFILTER_MIN_PAIRS = 1 << 22  # below this many (query, row) pairs the float32 search is as fast
#: below this many database rows (one CPU block) the float32 search is faster: the prefilter's per-query
#: error bound and rescoring are not amortised (measured: 1.58 M x 2,000 bank rows, 1536-d, B(t) of the
#: recognition post-processing: float32 6.8 s vs bfloat16 8.0 s per 10^5 queries, BENCHMARKS.md)
PREFILTER_MIN_DB = 16384
#: the choices of ``kernel.search.topk(prefilter=...)`` and of ``postprocess --search-prefilter``
PREFILTERS = ("auto", "bf16", "off")
_BF16_U = 2.0**-8
_BF16_C = _BF16_U / (1 - _BF16_U)
_bf16_state: dict[str, bool] = {}


def _summation_gamma(n: int) -> float:
    """Twice the classic bound n u / (1 - n u) on a float32 sum of ``n`` products (any order)."""
    nu = n * 2.0**-24
    return 2 * nu / (1 - nu)


def bf16_prefilter_available() -> bool:
    """True when this CPU multiplies bfloat16 matrices at least 1.5x faster than float32 ones and its
    bfloat16 products stay within the error bound the prefilter relies on (checked once, ~0.1 s)."""
    if "ok" not in _bf16_state:
        _bf16_state["ok"] = _calibrate_bf16()
        logger.debug("bfloat16 prefilter %s on this CPU", "on" if _bf16_state["ok"] else "off")
    return _bf16_state["ok"]


def _calibrate_bf16() -> bool:
    """Check the error bound on this CPU's bfloat16 products and time them against float32 ones."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(512, 512, generator=g)
    b = torch.randn(8192, 512, generator=g)
    try:
        with torch.inference_mode():
            a16, b16 = a.bfloat16(), b.bfloat16()
            s = torch.mm(a16[:64], b16[:1024].T).double()
            exact = a16[:64].double() @ b16[:1024].double().T  # float64 products of bf16 inputs: exact
            bound = _BF16_C * s.abs() + _summation_gamma(512) / 2 * (
                a16[:64].double().norm(dim=1)[:, None] * b16[:1024].double().norm(dim=1)[None, :])
            if not bool(((s - exact).abs() <= bound).all()):
                return False
            times = {}
            for name, (x, y) in (("f32", (a, b)), ("bf16", (a16, b16))):
                torch.mm(x, y.T)  # warm-up
                t = time.perf_counter()
                for _ in range(3):
                    torch.mm(x, y.T)
                times[name] = time.perf_counter() - t
    except RuntimeError:  # no bfloat16 matmul on this build
        return False
    return times["bf16"] * 1.5 <= times["f32"]


def use_prefilter(prefilter: str, dev: torch.device, dt: torch.dtype, score_fn, n_q: int, n_db: int,
                  k: int) -> bool:
    """Whether a search of ``n_q`` queries x ``n_db`` rows (top ``k``) runs with the prefilter.

    Only a plain (no ``score_fn``) float32 search on a CPU can, and only when ``k`` leaves rows out.
    ``"bf16"`` then always does; ``"auto"`` when the search has at least ``PREFILTER_MIN_PAIRS`` pairs and
    ``PREFILTER_MIN_DB`` rows and :func:`bf16_prefilter_available`; ``"off"`` never. Anything else is a
    ``ValueError``.
    """
    if prefilter not in PREFILTERS:
        raise ValueError(f"prefilter must be 'auto', 'bf16' or 'off', got {prefilter!r}")
    if prefilter == "off" or dev.type != "cpu" or dt != torch.float32 or score_fn is not None or k >= n_db:
        return False
    if prefilter == "bf16":
        return True
    return n_q * n_db >= PREFILTER_MIN_PAIRS and n_db >= PREFILTER_MIN_DB and bf16_prefilter_available()


class Bf16Database:
    """The database in bfloat16 next to its float32 rows, with the maxima the error bound needs."""

    def __init__(self, db: torch.Tensor, chunk: int = 1 << 16):
        self.f32 = db
        self.bf16 = torch.empty(db.shape, dtype=torch.bfloat16)
        err = norm = norm16 = 0.0
        for s in range(0, db.shape[0], chunk):
            x = db[s : s + chunk]
            x16 = self.bf16[s : s + chunk]
            x16.copy_(x)
            y = x16.float()
            err = max(err, float((x - y).norm(dim=1).max()))  # the differences are exact in float32
            norm = max(norm, float(x.norm(dim=1).max()))
            norm16 = max(norm16, float(y.norm(dim=1).max()))
        self.gamma = _summation_gamma(db.shape[1])
        up = 1 + self.gamma  # float32 norms: inflated past their own rounding
        self.max_err, self.max_norm, self.max_norm16 = err * up, norm * up, norm16 * up

    def bound(self, q: torch.Tensor, q16: torch.Tensor) -> torch.Tensor:
        """E_q (float64) for every query row: |s_acc - f| <= E_q for every database row."""
        q64, q16_64 = q.double(), q16.double()
        nq, nq16, eq = q64.norm(dim=1), q16_64.norm(dim=1), (q64 - q16_64).norm(dim=1)
        e = nq16 * self.max_err + eq * self.max_norm + self.gamma * (nq16 * self.max_norm16 + nq * self.max_norm)
        return e * (1 + 1e-6) + 1e-30  # margin for the float64 norms and products themselves


def _kth_largest(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of every row (-inf pads count as values)."""
    return torch.topk(x, k, dim=1, sorted=False).values.amin(dim=1)


def _band_threshold(kth: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Lowest block score that can still reach the top k: hi^-1(lo(kth) - 2E), rounded down to float32."""
    t = kth.double()
    y = t - _BF16_C * t.abs() - 2 * e
    thr = torch.where(y >= 0, y / (1 + _BF16_C), y / (1 - _BF16_C))
    thr = thr - 1e-7 * (thr.abs() + 1e-30)  # float64 -> float32 rounding can only lower it
    return torch.where(torch.isfinite(t), thr, torch.full_like(thr, -math.inf)).float()


def _at_least(block: torch.Tensor, thr: torch.Tensor, d0: int):
    """Every entry of a block >= its row's threshold, padded per row."""
    rows, cols = (block >= thr[:, None]).nonzero(as_tuple=True)
    return pad_rows(rows, cols + d0, block[rows, cols], block.shape[0], block.dtype)


def _merge_band(cur, new, k: int, e: torch.Tensor, prune_width: int):
    """Candidates of two sets that can still reach the top k (see the module docstring), and the block
    threshold they give (``None``: not computed, the previous one stays valid).

    The k-th value is only recomputed (and the set pruned to its band) once the set is wider than
    ``prune_width``: a stale threshold is lower, so still exact, and a selection per block would cost
    more than the few extra candidates it removes.
    """
    v = new[0] if cur is None else torch.cat([cur[0], new[0]], 1)
    i = new[1] if cur is None else torch.cat([cur[1], new[1]], 1)
    if v.shape[1] < k or v.shape[1] <= prune_width:
        return (v, i), None
    thr = _band_threshold(_kth_largest(v, k), e)
    keep = v >= thr[:, None]
    if bool(keep.all()):
        return (v, i), thr
    rows, cols = keep.nonzero(as_tuple=True)
    return pad_rows(rows, i[rows, cols], v[rows, cols], v.shape[0], v.dtype), thr


def _rescore(q: torch.Tensor, db: torch.Tensor, idx: torch.Tensor, k: int):
    """Exact top k of the candidates ``idx`` (-1 = padding) by float32 similarity, ties to the lowest index.

    The candidates' similarities are one sampled matrix product (``torch.sparse.sampled_addmm``: only the
    listed (query, row) dot products, no gathered copy of the rows), the same arithmetic for every pair,
    so equal rows give equal scores.
    """
    qn, n_db = idx.shape[0], db.shape[0]
    rows, cols = (idx >= 0).nonzero(as_tuple=True)
    ids = idx[rows, cols]
    _, order = torch.sort(rows * n_db + ids)  # CSR: rows ascending, columns ascending within a row
    rows, ids = rows[order], ids[order]
    crow = torch.zeros(qn + 1, dtype=torch.int64)
    torch.cumsum(torch.bincount(rows, minlength=qn), 0, out=crow[1:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta" and invariant checks
        pattern = torch.sparse_csr_tensor(crow, ids, torch.zeros(ids.numel()), size=(qn, n_db))
        f = torch.sparse.sampled_addmm(pattern, q, db.T, beta=0.0).values()
    scores, cand = pad_rows(rows, ids, f, qn, torch.float32)
    return select_topk(scores, cand, k)


def _first_threshold(block: torch.Tensor, seg_max: torch.Tensor | None, k: int, e: torch.Tensor):
    """A query chunk's first band threshold, from its first block (``None`` when it has fewer than k
    columns): k segments reach the k-th largest segment maximum, so that is a lower bound on the k-th
    largest score."""
    if seg_max is not None and seg_max.shape[1] >= k:
        return _band_threshold(_kth_largest(seg_max, k), e)
    if block.shape[1] >= k:
        return _band_threshold(_kth_largest(block, k), e)
    return None


def search_blocks_bf16(q_all, bdb: Bf16Database, kk, qc, dc, out_v, out_i, bar, threads) -> None:
    """The block loop of :func:`kernel.search.topk` with the prefilter: bfloat16 blocks, the band of every
    query chunk, then its float32 rescoring (threads as in :func:`kernel.search._search_blocks`)."""
    n_q, n_db = q_all.shape[0], bdb.f32.shape[0]
    w = segment_width(dc, kk)
    buf = torch.empty(qc * dc, dtype=torch.bfloat16)
    single = threads > 1
    with torch.inference_mode():
        for q0 in range(0, n_q, qc):
            q1 = min(n_q, q0 + qc)
            q = q_all[q0:q1].to(dtype=torch.float32).contiguous()
            q16 = q.bfloat16()
            e = bdb.bound(q, q16)
            cand, thr, prune_width = None, None, 0
            for d0 in range(0, n_db, dc):
                d1 = min(n_db, d0 + dc)
                if single:
                    torch.set_num_threads(threads)
                block = torch.mm(q16, bdb.bf16[d0:d1].T, out=buf[: (q1 - q0) * (d1 - d0)].view(q1 - q0, d1 - d0))
                seg_max = segment_max(block, w)
                if single:
                    torch.set_num_threads(1)
                if thr is None:
                    thr = _first_threshold(block, seg_max, kk, e)
                new = entries_above(block, seg_max, w, thr, kk, d0, strict=False) if thr is not None else None
                if new is None:
                    new = _at_least(block, thr if thr is not None else torch.full((q1 - q0,), -math.inf), d0)
                new = (new[0].float(), new[1])
                cand, new_thr = _merge_band(cand, new, kk, e, prune_width)
                if new_thr is not None:
                    thr, prune_width = new_thr, 2 * cand[0].shape[1]
                del block
            cand, _ = _merge_band(None, cand, kk, e, 0)  # the final band: fewer rows to rescore
            if single:
                torch.set_num_threads(threads)
            v, i = _rescore(q, bdb.f32, cand[1], kk)
            if single:
                torch.set_num_threads(1)
            out_v[q0:q1] = v.numpy()
            out_i[q0:q1] = i.numpy()
            bar.update(q1 - q0)

