"""Exact k-nearest-neighbour search by inner product (cosine on L2-normalised rows), of any size.

:func:`topk` compares every query with every database row, block by block, so memory stays bounded by
one ``query_chunk x db_chunk`` score block (plus ``k`` candidates per block and query) whatever the sizes
(10^4 queries x 1.58 M train descriptors included). Each block is one matrix product followed by a partial
selection of its best ``k`` (wide blocks keep that selection cheap next to the product); one final
selection over the blocks' candidates gives every query's answer. The result is exactly that of an
exhaustive search:

* float32 products everywhere, on a GPU too (IEEE float32: TF32 is switched off for the search), so a GPU
  gives the CPU's answers. float16 products were the P100-era default; on an H100 they changed the top-k
  order of near-ties and the confidences by up to 1e-3 (tests on the GPU, BENCHMARKS.md), and the float32
  products of the competition's searches take minutes on a T4 next to hours of extraction. ``dtype=`` still
  selects another compute dtype for a caller who accepts that;
* ties are broken deterministically: equal scores are ordered by ascending database position, and when
  equal scores straddle the k-th place the lowest positions are the ones kept;
* on CPUs with fast bfloat16 products, plain searches score in bfloat16 and rescore in float32 only the
  rows a rigorous error bound keeps: the same float32 answer (:mod:`kernel.prefilter`).

The selection inside a block (partial top k, tie rule, segment-maximum filter) is :mod:`kernel.selection`.

``score_fn`` lets a caller turn raw similarities into its own score before the selection (the soft
up/down re-ranking adds a per-pair bonus, the non-landmark post-processing clips and subtracts a per-row
bias), so the re-ranked top-k stays exact without ever holding the full score matrix.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

import kernel.rows
from kernel.devices import resolve_device  # noqa: F401  (also importable as search.resolve_device)
from kernel.prefilter import Bf16Database, search_blocks_bf16, use_prefilter
from kernel.rows import Rows
from kernel.selection import (block_candidates, entries_above, merge_sets, order_rows, segment_max, segment_width,
                              select_topk)

logger = logging.getLogger(__name__)

# score_fn(scores, query_rows, db_cols) -> scores: a float32 (bq, bd) block, the query positions
# (slice) and database positions (slice) it covers; may modify ``scores`` in place.
ScoreFn = Callable[[torch.Tensor, slice, slice], torch.Tensor]

#: elements of one score block (float32): 2^25 = 128 MiB on a CPU (2048 queries x 16 Ki columns),
#: 2^27 = 512 MiB on a GPU.
CPU_BLOCK_ELEMENTS = 1 << 25
GPU_BLOCK_ELEMENTS = 1 << 27


def compute_dtype(device: torch.device) -> torch.dtype:
    """The default compute dtype of the products: float32 on every device (see the module docstring)."""
    return torch.float32


@contextmanager
def exact_float32():
    """IEEE float32 matrix products for the duration (no TF32 on GPUs that have it), restored afterwards."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def to_device(x, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A 2-d numpy array / tensor as a contiguous tensor on ``device`` in ``dtype`` (no copy when it already is)."""
    t = torch.as_tensor(x) if not isinstance(x, torch.Tensor) else x
    if t.ndim != 2:
        raise ValueError(f"expected a 2-d descriptor array, got shape {tuple(t.shape)}")
    return t.to(device=device, dtype=dtype).contiguous()




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

    On a CPU every block is written into one reused buffer: a fresh 128 MiB block each time would cost
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
    prefilter: str = "auto",
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
        dtype: compute dtype of the matrix products; default float32 (on a GPU too, see above).
        score_fn: ``score_fn(block, query_rows, db_cols)`` turns a float32 similarity block into scores.
        query_chunk, db_chunk, block_elements: block shape; by default a block holds about
            ``CPU_BLOCK_ELEMENTS`` float32 scores on a CPU (2^25: 128 MiB) and ``GPU_BLOCK_ELEMENTS`` on a
            GPU (2^27), see :func:`chunk_sizes`.
        prefilter: on a CPU in float32 without ``score_fn``: ``"bf16"`` scores every pair in bfloat16 and
            rescores in float32 only the rows a rigorous error bound keeps (same exact result, faster where
            the CPU has bfloat16 dot products), ``"off"`` never, ``"auto"`` (default) when this CPU's
            bfloat16 products are measurably faster and the search is large enough to pay
            (:func:`kernel.prefilter.use_prefilter`); the ``postprocess`` command's ``--search-prefilter``.
        progress: show a tqdm bar over query chunks (over passes when a side is :class:`Rows`).

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
    bf16 = use_prefilter(prefilter, dev, dt, score_fn, n_q, n_db, kk)
    product = None if bf16 else _Product(db, dev, dt, qc, dc)
    bar = tqdm(total=n_q, desc=desc, unit="q", disable=not progress, leave=False)
    threads = torch.get_num_threads()
    try:
        with exact_float32():
            if bf16:
                search_blocks_bf16(q_all, Bf16Database(db), kk, qc, dc, out_v, out_i, bar, threads)
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


def pass_rows(rows: Rows, dev: torch.device, dt: torch.dtype, pass_bytes: int | None, resident: bool = False) -> int:
    """Rows of one pass: ``pass_bytes`` worth in ``dt``. ``resident`` (the database side): on a GPU, every row
    when they take at most half of the free device memory (they then stay on the device for the whole search;
    the queries never do: they are built in host memory a pass at a time)."""
    row_bytes = rows.dim * torch.tensor([], dtype=dt).element_size()
    if resident and dev.type == "cuda":
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
    n_db, n_q = len(database), len(queries)
    kk = min(k, n_db)
    if n_q == 0 or kk == 0:  # as topk answers an empty side
        return np.empty((n_q, kk), dtype=np.float32), np.empty((n_q, kk), dtype=np.int64)
    d_step = pass_rows(database, dev, dt, pass_bytes, resident=True) if isinstance(database, Rows) else n_db
    if not isinstance(database, Rows):
        database = to_device(database, dev, dt)
    elif d_step >= n_db:
        database = load_rows(database, 0, n_db, dev, dt)
    q_step = pass_rows(queries, dev, dt, pass_bytes) if isinstance(queries, Rows) else n_q
    out_v = np.empty((n_q, kk), dtype=np.float32)
    out_i = np.empty((n_q, kk), dtype=np.int64)
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
                new = entries_above(block, seg_max, w, thr, kk, d0) if filtering else None
                if new is None:
                    v, i = block_candidates(block, kk)
                    new = (v, i + d0)
                best = merge_sets(best, new, kk)
                seen += d1 - d0
                del block
            v, i = order_rows(*best)
            out_v[q0:q1] = v.cpu().numpy()
            out_i[q0:q1] = i.cpu().numpy()
            bar.update(q1 - q0)
