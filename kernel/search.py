"""Exact k-nearest-neighbour search by inner product (cosine on L2-normalised rows), of any size.

:func:`topk` compares every query with every database row, block by block, so memory stays bounded by
one ``query_chunk x db_chunk`` score block (plus ``k`` candidates per block and query) whatever the sizes
(10^4 queries x 1.58 M train descriptors included). Each block is one matrix product followed by a partial
selection of its best ``k`` (wide blocks keep that selection cheap next to the product); one final
selection over the blocks' candidates gives every query's answer. The result is exactly that of an
exhaustive search:

* float32 on a CPU; on a GPU the descriptors live in float16 (half the memory, twice the speed of the
  P100's fp16 units) and the block scores are turned to float32 before any further arithmetic, so the
  result equals an exhaustive search over the float16 similarities;
* ties are broken deterministically: equal scores are ordered by ascending database position, and when
  equal scores straddle the k-th place the lowest positions are the ones kept.

``score_fn`` lets a caller turn raw similarities into its own score before the selection (the soft
up/down re-ranking adds a per-pair bonus, the non-landmark post-processing clips and subtracts a per-row
bias), so the re-ranked top-k stays exact without ever holding the full score matrix.
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

# score_fn(scores, query_rows, db_cols) -> scores: a float32 (bq, bd) block, the query positions
# (slice) and database positions (slice) it covers; may modify ``scores`` in place.
ScoreFn = Callable[[torch.Tensor, slice, slice], torch.Tensor]

#: elements of one score block (float32): 2^25 = 128 MiB on a CPU (2048 queries x 16 Ki columns),
#: 2^27 on a GPU (fp16 product, then a float32 copy: 768 MiB).
CPU_BLOCK_ELEMENTS = 1 << 25
GPU_BLOCK_ELEMENTS = 1 << 27


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` -> the first CUDA GPU when there is one, else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def compute_dtype(device: torch.device) -> torch.dtype:
    """float16 on a GPU, float32 on a CPU."""
    return torch.float16 if device.type == "cuda" else torch.float32


def to_device(x, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A 2-d numpy array / tensor as a contiguous tensor on ``device`` in ``dtype`` (no copy when it already is)."""
    t = torch.as_tensor(x) if not isinstance(x, torch.Tensor) else x
    if t.ndim != 2:
        raise ValueError(f"expected a 2-d descriptor array, got shape {tuple(t.shape)}")
    return t.to(device=device, dtype=dtype).contiguous()


def _order_rows(vals: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by (value descending, index ascending)."""
    idx, perm = torch.sort(idx, dim=1)
    vals = torch.gather(vals, 1, perm)
    vals, perm = torch.sort(vals, dim=1, descending=True, stable=True)
    return vals, torch.gather(idx, 1, perm)


def select_topk(
    vals: torch.Tensor, idx: torch.Tensor | None, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``k`` entries of every row, ordered by (value desc, index asc); exact under ties.

    ``idx`` holds the index of every entry (``None``: its column). When equal values straddle the k-th
    place, the lowest indices are kept.
    """
    n = vals.shape[1]
    if idx is None:
        idx = torch.arange(n, device=vals.device).expand(vals.shape[0], n)
    if k >= n:
        return _order_rows(vals, idx)
    top, pos = torch.topk(vals, k + 1, dim=1, sorted=True)
    tied = top[:, k - 1] == top[:, k]  # the k-th value also appears outside the chosen k
    out_v, out_i = _order_rows(top[:, :k], torch.gather(idx, 1, pos[:, :k]))
    if bool(tied.any()):
        rows = tied.nonzero().flatten()
        # rare: a full (index, value) sort of just these rows applies the tie rule exactly
        v, i = _order_rows(vals[rows], idx[rows])
        out_v[rows], out_i[rows] = v[:, :k], i[:, :k]
    return out_v, out_i


def block_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``k`` columns of every row of a score block, ordered by (score desc, column asc)."""
    return select_topk(scores, None, k)


def _block_candidates(block: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact top-``k`` column set of every row of a block, unordered (cheaper than :func:`block_topk`).

    Rows whose k-th and (k+1)-th values are equal take the lowest columns among the tied ones.
    """
    n = block.shape[1]
    if k >= n:
        return block.clone(), torch.arange(n, device=block.device).expand(block.shape[0], n)
    top, pos = torch.topk(block, k + 1, dim=1, sorted=True)
    tied = top[:, k - 1] == top[:, k]
    top, pos = top[:, :k], pos[:, :k]
    if bool(tied.any()):
        rows = tied.nonzero().flatten()
        v, i = block_topk(block[rows], k)
        top, pos = top.clone(), pos.clone()
        top[rows], pos[rows] = v, i
    return top, pos


def _merge_sets(
    cur: tuple[torch.Tensor, torch.Tensor] | None, new: tuple[torch.Tensor, torch.Tensor], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` set (unordered) of two candidate sets, ties to the lowest index."""
    if cur is None:
        v, i = new
    else:
        v, i = torch.cat([cur[0], new[0]], 1), torch.cat([cur[1], new[1]], 1)
    if v.shape[1] <= k:
        return v, i
    top, pos = torch.topk(v, k + 1, dim=1, sorted=True)
    tied = top[:, k - 1] == top[:, k]
    top, pos = top[:, :k], pos[:, :k]
    idx = torch.gather(i, 1, pos)
    if bool(tied.any()):
        rows = tied.nonzero().flatten()
        ov, oi = _order_rows(v[rows], i[rows])
        top[rows], idx[rows] = ov[:, :k], oi[:, :k]
    return top, idx


#: columns per segment of the segment-maximum filter (0: no filter, a full partial selection per block)
SEGMENT = 32


def segment_width(db_chunk: int, k: int) -> int:
    """Segment width for blocks of ``db_chunk`` columns: ``SEGMENT``, halved (down to 4) until a block
    has at least 8 k segments, so that a first block's threshold (the k-th largest segment maximum)
    leaves few segments to look at. 0 turns the filter off."""
    w = SEGMENT
    while w > 4 and db_chunk // w < 8 * k:
        w //= 2
    return w


def segment_max(block: torch.Tensor, w: int) -> torch.Tensor | None:
    """Maximum of every ``w``-column segment of a block (the trailing partial segment left out)."""
    full = block.shape[1] // w if w else 0
    if full == 0:
        return None
    return block[:, : full * w].reshape(block.shape[0], full, w).amax(dim=2)


def _above(block: torch.Tensor, seg_max: torch.Tensor | None, w: int, thr: torch.Tensor | None, k: int,
           d0: int, strict: bool = True):
    """Entries of a score block that can still enter the top ``k``, padded per row (-inf, index -1).

    ``seg_max`` holds the maximum of every ``w``-column segment (:func:`segment_max`); only segments whose
    maximum passes the row's threshold are looked at. With ``thr`` None (a row's first block) the
    threshold is the k-th largest segment maximum, which at least k entries reach, so every entry of the
    top k is kept (``>=``). Later blocks use the current k-th value: an entry equal to it loses the tie
    (its index is higher), so only strictly larger entries are kept. ``None`` when filtering would not
    pay (too many survivors, or fewer segments than ``k``).
    """
    qn, n = block.shape
    if seg_max is None or (thr is None and seg_max.shape[1] < k):
        return None
    full = seg_max.shape[1]
    segs = block[:, : full * w].reshape(qn, full, w)
    if thr is None:
        thr, strict = torch.topk(seg_max, k, dim=1, sorted=True).values[:, -1], False
    hit = seg_max > thr[:, None] if strict else seg_max >= thr[:, None]
    r, s = hit.nonzero(as_tuple=True)  # row-major: r ascending
    if r.numel() * w > block.numel() // 4:
        return None
    if n == full * w:  # (hits, w): whole segments, as row copies of a (rows * segments, w) view
        vals = segs.view(-1, w).index_select(0, r * full + s)
    else:  # a partial last segment: that view would be a copy of the block
        vals = segs[r, s]
    t = thr[r][:, None]
    kr, kc = ((vals > t) if strict else (vals >= t)).nonzero(as_tuple=True)
    rows, cols, vals = r[kr], s[kr] * w + kc, vals[kr, kc]
    if n > full * w:  # the last, partial segment: compare directly
        tail = block[:, full * w :]
        tr, tc = ((tail > thr[:, None]) if strict else (tail >= thr[:, None])).nonzero(as_tuple=True)
        rows, cols, vals = torch.cat([rows, tr]), torch.cat([cols, tc + full * w]), torch.cat([vals, tail[tr, tc]])
        rows, order = torch.sort(rows, stable=True)
        cols, vals = cols[order], vals[order]
    counts = torch.bincount(rows, minlength=qn)
    width = int(counts.max()) if rows.numel() else 0
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(rows.numel(), device=block.device) - starts[rows]
    out_v = torch.full((qn, max(width, 1)), -math.inf, device=block.device, dtype=block.dtype)
    out_i = torch.full((qn, max(width, 1)), -1, device=block.device, dtype=torch.int64)
    out_v[rows, slot] = vals
    out_i[rows, slot] = cols + d0
    return out_v, out_i


def chunk_sizes(n_query: int, n_db: int, k: int, device: torch.device, block_elements: int | None = None):
    """(query_chunk, db_chunk) for a score block of about ``block_elements`` floats.

    Database blocks are wide (16 Ki columns on a CPU, 64 Ki on a GPU, and at least 64 (k + 1)) so the
    per-block selection is cheap next to the matrix product; the query chunk fills the budget.
    """
    budget = block_elements or (GPU_BLOCK_ELEMENTS if device.type == "cuda" else CPU_BLOCK_ELEMENTS)
    db_chunk = max(64 * (k + 1), 65536 if device.type == "cuda" else 16384)
    db_chunk = max(1, min(db_chunk, n_db))
    query_chunk = max(1, min(n_query, budget // db_chunk))
    if query_chunk == n_query and n_db > db_chunk:  # few queries: widen the database block instead
        db_chunk = min(n_db, max(db_chunk, budget // max(n_query, 1)))
    return query_chunk, db_chunk


class _Product:
    """``q @ db[d0:d1].T`` as a float32 block (torch.mm; fp16 products are turned to float32).

    On a CPU every block is written into one reused buffer: a fresh 100 MiB block each time would cost
    page faults and zeroing, about a tenth of the product itself.
    """

    def __init__(self, db: torch.Tensor, device: torch.device, dtype: torch.dtype, qc: int, dc: int):
        self.db = db
        self.buf = torch.empty(qc * dc, dtype=torch.float32) if device.type == "cpu" and dtype == torch.float32 else None

    def __call__(self, q: torch.Tensor, d0: int, d1: int) -> torch.Tensor:
        if self.buf is not None:
            out = self.buf[: q.shape[0] * (d1 - d0)].view(q.shape[0], d1 - d0)
            return torch.mm(q, self.db[d0:d1].T, out=out)
        block = torch.mm(q, self.db[d0:d1].T)
        return block if block.dtype == torch.float32 else block.float()


def topk(
    queries,
    database,
    k: int,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    score_fn: ScoreFn | None = None,
    query_chunk: int | None = None,
    db_chunk: int | None = None,
    block_elements: int | None = None,
    progress: bool = False,
    desc: str = "search",
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of ``queries @ database.T`` (optionally re-scored by ``score_fn``).

    Args:
        queries: (Nq, D) array or tensor (L2-normalised rows for cosine).
        database: (Nd, D) array or tensor.
        k: neighbours per query; fewer when the database is smaller.
        device: torch device; ``None`` picks CUDA when available, else the CPU.
        dtype: compute dtype of the matrix products; default float16 on CUDA, float32 on a CPU.
        score_fn: ``score_fn(block, query_rows, db_cols)`` turns a float32 similarity block into scores.
        query_chunk, db_chunk, block_elements: block shape (defaults keep one block at 32 MiB on a CPU).
        progress: show a tqdm bar over query chunks.

    Returns:
        ``(scores, indices)``: float32 and int64 arrays of shape (Nq, min(k, Nd)), each row ordered by
        score descending, equal scores by ascending database position.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    dev = resolve_device(device)
    dt = dtype or compute_dtype(dev)
    db = to_device(database, dev, dt)
    q_all = queries if isinstance(queries, torch.Tensor) else torch.as_tensor(np.asarray(queries))
    if q_all.ndim != 2 or q_all.shape[1] != db.shape[1]:
        raise ValueError(f"query shape {tuple(q_all.shape)} does not match database shape {tuple(db.shape)}")
    n_q, n_db = q_all.shape[0], db.shape[0]
    kk = min(k, n_db)
    out_v = np.empty((n_q, kk), dtype=np.float32)
    out_i = np.empty((n_q, kk), dtype=np.int64)
    if n_q == 0 or kk == 0:
        return out_v, out_i
    qc, dc = chunk_sizes(n_q, n_db, kk, dev, block_elements)
    qc, dc = query_chunk or qc, db_chunk or dc
    product = _Product(db, dev, dt, qc, dc)
    bar = tqdm(total=n_q, desc=desc, unit="q", disable=not progress, leave=False)
    threads = torch.get_num_threads()
    try:
        _search_blocks(q_all, product, score_fn, kk, qc, dc, dev, dt, out_v, out_i, bar, threads)
    finally:
        torch.set_num_threads(threads)
        bar.close()
    return out_v, out_i


def _search_blocks(q_all, product, score_fn, kk, qc, dc, dev, dt, out_v, out_i, bar, threads) -> None:
    """The block loop of :func:`topk`.

    On a CPU the products run on all ``threads`` and everything else on one: the selection is a few
    light passes and many small operations, and a parallel region of a small operation waits for every
    thread (on a shared 2-core machine a descheduled thread makes each wait milliseconds long).
    """
    n_q, n_db = q_all.shape[0], product.db.shape[0]
    single = dev.type == "cpu" and threads > 1
    w = segment_width(dc, kk)
    if single:
        torch.set_num_threads(1)
    with torch.inference_mode():
        for q0 in range(0, n_q, qc):
            q1 = min(n_q, q0 + qc)
            q = q_all[q0:q1].to(device=dev, dtype=dt).contiguous()
            best = None  # exact top-k set so far (unordered); ordered once at the end
            seen = 0
            for d0 in range(0, n_db, dc):
                d1 = min(n_db, d0 + dc)
                if single:
                    torch.set_num_threads(threads)
                block = product(q, d0, d1)
                if score_fn is not None:
                    block = score_fn(block, slice(q0, q1), slice(d0, d1))
                # every row holds k candidates after ``kk`` columns: prune by its k-th value
                thr = best[0].amin(dim=1) if seen >= kk else None
                filtering = thr is not None or best is None
                seg_max = segment_max(block, w) if filtering else None  # the one full pass: all threads
                if single:
                    torch.set_num_threads(1)
                new = _above(block, seg_max, w, thr, kk, d0) if filtering else None
                if new is None:
                    v, i = _block_candidates(block, kk)
                    new = (v, i + d0)
                best = _merge_sets(best, new, kk)
                seen += d1 - d0
                del block
            v, i = _order_rows(*best)
            out_v[q0:q1] = v.cpu().numpy()
            out_i[q0:q1] = i.cpu().numpy()
            bar.update(q1 - q0)


def cosine_topk(queries, database, k: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """:func:`topk` on plain similarities (an alias that reads better at call sites)."""
    return topk(queries, database, k, **kwargs)
