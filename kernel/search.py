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
  equal scores straddle the k-th place the lowest positions are the ones kept;
* on CPUs with fast bfloat16 products, plain searches score in bfloat16 and rescore in float32 only the
  rows a rigorous error bound keeps: the same float32 answer (the "bfloat16 prefilter" section below).

``score_fn`` lets a caller turn raw similarities into its own score before the selection (the soft
up/down re-ranking adds a per-pair bonus, the non-landmark post-processing clips and subtracts a per-row
bias), so the re-ranked top-k stays exact without ever holding the full score matrix.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

import kernel.rows
from kernel.rows import Rows

logger = logging.getLogger(__name__)

# score_fn(scores, query_rows, db_cols) -> scores: a float32 (bq, bd) block, the query positions
# (slice) and database positions (slice) it covers; may modify ``scores`` in place.
ScoreFn = Callable[[torch.Tensor, slice, slice], torch.Tensor]

#: elements of one score block (float32): 2^25 = 128 MiB on a CPU (2048 queries x 16 Ki columns),
#: 2^27 on a GPU (fp16 product, then a float32 copy: 768 MiB).
CPU_BLOCK_ELEMENTS = 1 << 25
GPU_BLOCK_ELEMENTS = 1 << 27


from kernel.devices import resolve_device  # noqa: E402,F401  (kept importable as search.resolve_device)


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
    """Maximum of every segment of a block: the first ``w * full`` columns (``full = width // w``) seen as
    ``w`` rows of ``full`` columns, segment ``s`` is column ``s`` of those rows (block columns
    ``s, s + full, s + 2 full, ...``), the trailing ``width - w * full`` columns left out. Strided segments
    make the maximum a streaming element-wise maximum of ``w`` rows (several times faster than a
    reduction over short contiguous runs)."""
    full = block.shape[1] // w if w else 0
    if full == 0:
        return None
    return block[:, : full * w].view(block.shape[0], w, full).amax(dim=1)


def _pad_rows(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, qn: int, dtype: torch.dtype):
    """(rows ascending, cols, vals) entries as per-row padded arrays (value -inf, index -1)."""
    counts = torch.bincount(rows, minlength=qn)
    width = max(int(counts.max()) if rows.numel() else 0, 1)
    slot = torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows]
    out_v = torch.full((qn, width), -math.inf, dtype=dtype, device=rows.device)
    out_i = torch.full((qn, width), -1, dtype=torch.int64, device=rows.device)
    out_v[rows, slot] = vals
    out_i[rows, slot] = cols
    return out_v, out_i


def _above(block: torch.Tensor, seg_max: torch.Tensor | None, w: int, thr: torch.Tensor | None, k: int,
           d0: int, strict: bool = True):
    """Entries of a score block that can still enter the top ``k``, padded per row (-inf, index -1).

    ``seg_max`` holds the maximum of every segment (:func:`segment_max`); only segments whose maximum
    passes the row's threshold are looked at. With ``thr`` None (a row's first block) the threshold is
    the k-th largest segment maximum, which at least k entries reach, so every entry of the top k is kept
    (``>=``). Later blocks use the current k-th value: an entry equal to it loses the tie (its index is
    higher), so only strictly larger entries are kept. ``None`` when filtering would not pay (too many
    survivors, or fewer segments than ``k``).
    """
    qn, n = block.shape
    if seg_max is None or (thr is None and seg_max.shape[1] < k):
        return None
    full = seg_max.shape[1]
    segs = block[:, : full * w].view(qn, w, full)
    if thr is None:
        thr, strict = torch.topk(seg_max, k, dim=1, sorted=True).values[:, -1], False
    hit = seg_max > thr[:, None] if strict else seg_max >= thr[:, None]
    r, s = hit.nonzero(as_tuple=True)  # row-major: r ascending
    if r.numel() * w > block.numel() // 4:
        return None
    vals = segs[r, :, s]  # (hits, w): the w members of every hit segment
    t = thr[r][:, None]
    kr, kc = ((vals > t) if strict else (vals >= t)).nonzero(as_tuple=True)
    rows, cols, vals = r[kr], kc * full + s[kr], vals[kr, kc]
    if n > full * w:  # the trailing columns: compare directly
        tail = block[:, full * w :]
        tr, tc = ((tail > thr[:, None]) if strict else (tail >= thr[:, None])).nonzero(as_tuple=True)
        rows, cols, vals = torch.cat([rows, tr]), torch.cat([cols, tc + full * w]), torch.cat([vals, tail[tr, tc]])
        rows, order = torch.sort(rows, stable=True)
        cols, vals = cols[order], vals[order]
    return _pad_rows(rows, cols + d0, vals, qn, block.dtype)


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
    prefilter: str | None = None,
    pass_bytes: int | None = None,
    progress: bool = False,
    desc: str = "search",
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of ``queries @ database.T`` (optionally re-scored by ``score_fn``).

    Args:
        queries: (Nq, D) array or tensor (L2-normalised rows for cosine), or :class:`kernel.rows.Rows`.
        database: (Nd, D) array or tensor, or :class:`kernel.rows.Rows` (read from disk in passes of
            about ``pass_bytes`` bytes in the compute dtype; the result is the same, see :func:`_topk_rows`).
        k: neighbours per query; fewer when the database is smaller.
        device: torch device; ``None`` picks CUDA when available, else the CPU.
        dtype: compute dtype of the matrix products; default float16 on CUDA, float32 on a CPU.
        score_fn: ``score_fn(block, query_rows, db_cols)`` turns a float32 similarity block into scores.
        query_chunk, db_chunk, block_elements: block shape (defaults keep one block at 32 MiB on a CPU).
        prefilter: on a CPU in float32 without ``score_fn``: ``"bf16"`` scores every pair in bfloat16 and
            rescores in float32 only the rows a rigorous error bound keeps (same exact result, faster where
            the CPU has bfloat16 dot products), ``"off"`` never, ``"auto"`` (default) when this CPU's
            bfloat16 products are measurably faster and the search has at least
            ``PREFILTER_MIN_PAIRS`` pairs and ``PREFILTER_MIN_DB`` database rows. ``None``: ``DEFAULT_PREFILTER`` (``"auto"``; the
            ``postprocess`` command's ``--search-prefilter`` sets it).
        progress: show a tqdm bar over query chunks.

    Returns:
        ``(scores, indices)``: float32 and int64 arrays of shape (Nq, min(k, Nd)), each row ordered by
        score descending, equal scores by ascending database position.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    dev = resolve_device(device)
    dt = dtype or compute_dtype(dev)
    if isinstance(queries, Rows) or isinstance(database, Rows):
        return _topk_rows(queries, database, k, dev, dt, score_fn, pass_bytes, progress, desc,
                          dict(query_chunk=query_chunk, db_chunk=db_chunk, block_elements=block_elements,
                               prefilter=prefilter))
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
    bf16 = _use_prefilter(prefilter or DEFAULT_PREFILTER, dev, dt, score_fn, n_q, n_db, kk)
    product = None if bf16 else _Product(db, dev, dt, qc, dc)
    bar = tqdm(total=n_q, desc=desc, unit="q", disable=not progress, leave=False)
    threads = torch.get_num_threads()
    try:
        if bf16:
            _search_blocks_bf16(q_all, _Bf16Database(db), kk, qc, dc, out_v, out_i, bar, threads)
        else:
            _search_blocks(q_all, product, score_fn, kk, qc, dc, dev, dt, out_v, out_i, bar, threads)
    finally:
        torch.set_num_threads(threads)
        bar.close()
    return out_v, out_i


#: default bytes of one pass over a streamed database (in the compute dtype); ``pass_bytes`` overrides it
PASS_BYTES = 512 << 20


def _shifted(score_fn: ScoreFn | None, q0: int, d0: int) -> ScoreFn | None:
    """``score_fn`` seeing global query / database positions when called on a pass starting at (q0, d0)."""
    if score_fn is None or (q0 == 0 and d0 == 0):
        return score_fn
    return lambda b, r, c: score_fn(b, slice(r.start + q0, r.stop + q0), slice(c.start + d0, c.stop + d0))


def pass_rows(rows: Rows, dev: torch.device, dt: torch.dtype, pass_bytes: int | None) -> int:
    """Rows of one pass: ``pass_bytes`` worth in ``dt``; on a GPU the whole database when it takes at
    most half of the free device memory (it then stays on the device for the whole search)."""
    row_bytes = rows.dim * torch.tensor([], dtype=dt).element_size()
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        if len(rows) * row_bytes <= free // 2:
            return max(1, len(rows))
    return max(1, min(len(rows), (pass_bytes or PASS_BYTES) // row_bytes))


def load_rows(rows: Rows, r0: int, r1: int, dev: torch.device, dt: torch.dtype) -> torch.Tensor:
    """Rows ``r0:r1`` as one (r1 - r0, D) tensor on ``dev`` in ``dt``, filled a read at a time."""
    out = torch.empty((r1 - r0, rows.dim), dtype=dt, device=dev)
    step = kernel.rows.READ_ROWS
    for s in range(r0, r1, step):
        e = min(r1, s + step)
        out[s - r0 : e - r0] = torch.from_numpy(rows.block(s, e))
    return out


def _topk_rows(queries, database, k, dev, dt, score_fn, pass_bytes, progress, desc, opts):
    """:func:`topk` with :class:`Rows` on either side: passes over the queries and the database.

    Every pass is an exact search of the queries against a slice of the database; the passes' results
    are merged by :func:`select_topk` on (score, global position), so the answer, ties included, is that
    of one search over the whole database. A database that fits one pass is read once.
    """
    n_db = len(database)
    kk = min(k, n_db)
    if not isinstance(database, Rows):
        database = to_device(database, dev, dt)
    elif pass_rows(database, dev, dt, pass_bytes) >= n_db:
        database = load_rows(database, 0, n_db, dev, dt)
    q_step = pass_rows(queries, dev, dt, pass_bytes) if isinstance(queries, Rows) else max(1, len(queries))
    n_q = len(queries)
    out_v = np.empty((n_q, kk), dtype=np.float32)
    out_i = np.empty((n_q, kk), dtype=np.int64)
    d_step = pass_rows(database, dev, dt, pass_bytes) if isinstance(database, Rows) else max(1, n_db)
    bar = tqdm(total=math.ceil(n_q / q_step) * math.ceil(n_db / d_step), desc=desc, unit="pass",
               disable=not progress, leave=False)
    try:
        for q0 in range(0, n_q, q_step):
            q1 = min(n_q, q0 + q_step)
            q = queries.block(q0, q1) if isinstance(queries, Rows) else queries[q0:q1]
            out_v[q0:q1], out_i[q0:q1] = _topk_db_passes(q, database, kk, dev, dt, _shifted(score_fn, q0, 0),
                                                         d_step, opts, bar)
    finally:
        bar.close()
    return out_v, out_i


def _topk_db_passes(q, database, k, dev, dt, score_fn, step, opts, bar):
    """Exact top-``k`` of ``q`` over a database that is a tensor (one search) or :class:`Rows` (passes
    of ``step`` rows)."""
    if not isinstance(database, Rows):
        bar.update(1)
        return topk(q, database, k, device=dev, dtype=dt, score_fn=score_fn, **opts)
    best = None
    for d0 in range(0, len(database), step):
        d1 = min(len(database), d0 + step)
        db = load_rows(database, d0, d1, dev, dt)
        v, i = topk(q, db, k, device=dev, dtype=dt, score_fn=_shifted(score_fn, 0, d0), **opts)
        del db
        v, i = torch.from_numpy(v), torch.from_numpy(i) + d0
        best = (v, i) if best is None else select_topk(torch.cat([best[0], v], 1), torch.cat([best[1], i], 1), k)
        bar.update(1)
    return best[0].numpy(), best[1].numpy()


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


# --------------------------------------------------------------------------------------------------
# bfloat16 prefilter (CPU): an exact search at the speed of a bfloat16 matrix product
# --------------------------------------------------------------------------------------------------
#
# CPUs with native bfloat16 dot products (AVX512-BF16, AMX) multiply bfloat16 matrices 2-4x faster than
# float32 ones. The prefilter scores every pair in bfloat16, keeps per query every database row that a
# rigorous error bound says *could* be in the float32 top k, and rescores only those in float32:
#
#   q' = bf16(q), d' = bf16(d); s_acc = float32 accumulation of q'.d'; s = bf16(s_acc) (the block);
#   f = float32 rescoring of q.d (the value returned).
#   |s_acc - f| <= E_q = |q'| max|d - d'| + |q - q'| max|d| + g (|q'| max|d'| + |q| max|d|),
#   g = 2 n 2^-24 (twice the classic bound of any float32 summation order of n products);
#   |s - s_acc| <= c |s|, c = u / (1 - u), u = 2^-8 (round to nearest bfloat16).
#
# So f lies in [lo(s) - E, hi(s) + E] with lo(x) = x - c|x|, hi(x) = x + c|x|. If T is the k-th
# largest block score of a query so far, k rows have f >= lo(T) - E, so the final k-th float32 score is
# at least that, and a row can only enter the top k if hi(s) + E >= lo(T) - E, i.e.
# s >= hi^-1(lo(T) - 2E). Keeping exactly those rows (a band of a few k per query) and ranking them by f
# gives the exact float32 top k, ties included. The bound is checked once against this CPU's actual
# bfloat16 products (:func:`bf16_prefilter_available`), and "auto" only uses the prefilter where the
# bfloat16 product is really faster.

PREFILTER_MIN_PAIRS = 1 << 22  # below this many (query, row) pairs the float32 search is as fast
#: below this many database rows (one CPU block) the float32 search is faster: the prefilter's per-query
#: error bound and rescoring are not amortised (measured: 1.58 M x 2,000 bank rows, 1536-d, B(t) of the
#: recognition post-processing: float32 6.8 s vs bfloat16 8.0 s per 10^5 queries, BENCHMARKS.md)
PREFILTER_MIN_DB = 16384
PREFILTERS = ("auto", "bf16", "off")
DEFAULT_PREFILTER = "auto"  # what topk(prefilter=None) uses
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


def _use_prefilter(prefilter: str, dev: torch.device, dt: torch.dtype, score_fn, n_q: int, n_db: int,
                   k: int) -> bool:
    if prefilter not in PREFILTERS:
        raise ValueError(f"prefilter must be 'auto', 'bf16' or 'off', got {prefilter!r}")
    if prefilter == "off" or dev.type != "cpu" or dt != torch.float32 or score_fn is not None or k >= n_db:
        return False
    if prefilter == "bf16":
        return True
    return n_q * n_db >= PREFILTER_MIN_PAIRS and n_db >= PREFILTER_MIN_DB and bf16_prefilter_available()


class _Bf16Database:
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
    return _pad_rows(rows, cols + d0, block[rows, cols], block.shape[0], block.dtype)


def _merge_band(cur, new, k: int, e: torch.Tensor, prune_width: int):
    """Candidates of two sets that can still reach the top k (see the section comment), and the block
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
    return _pad_rows(rows, i[rows, cols], v[rows, cols], v.shape[0], v.dtype), thr


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
    scores, cand = _pad_rows(rows, ids, f, qn, torch.float32)
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


def _search_blocks_bf16(q_all, bdb: _Bf16Database, kk, qc, dc, out_v, out_i, bar, threads) -> None:
    """The block loop of :func:`topk` with the bfloat16 prefilter (threads as in :func:`_search_blocks`)."""
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
                new = _above(block, seg_max, w, thr, kk, d0, strict=False) if thr is not None else None
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


def cosine_topk(queries, database, k: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """:func:`topk` on plain similarities (an alias that reads better at call sites)."""
    return topk(queries, database, k, **kwargs)
