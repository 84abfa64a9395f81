"""Exact top-k selection inside score blocks, with the tie rule of :func:`kernel.search.topk`.

Every function here works on one block of scores (rows: queries, columns: database positions) or on
candidate sets built from blocks, and keeps the same rule: the best ``k`` entries of a row by value, equal
values ordered by ascending index, and when equal values straddle the k-th place the lowest indices are
the ones kept. The segment-maximum filter (:func:`segment_max`, :func:`entries_above`) skips most of a
block once a row's k-th value is known. :mod:`kernel.search` (float32 / float16 blocks) and
:mod:`kernel.prefilter` (bfloat16 blocks) both build on these.
"""
from __future__ import annotations

import math

import torch


def order_rows(vals: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
        return order_rows(vals, idx)
    top, pos = torch.topk(vals, k + 1, dim=1, sorted=True)
    tied = top[:, k - 1] == top[:, k]  # the k-th value also appears outside the chosen k
    out_v, out_i = order_rows(top[:, :k], torch.gather(idx, 1, pos[:, :k]))
    if bool(tied.any()):
        rows = tied.nonzero().flatten()
        # rare: a full (index, value) sort of just these rows applies the tie rule exactly
        v, i = order_rows(vals[rows], idx[rows])
        out_v[rows], out_i[rows] = v[:, :k], i[:, :k]
    return out_v, out_i


def block_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``k`` columns of every row of a score block, ordered by (score desc, column asc)."""
    return select_topk(scores, None, k)


def block_candidates(block: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def merge_sets(
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
        ov, oi = order_rows(v[rows], i[rows])
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


def pad_rows(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, qn: int, dtype: torch.dtype):
    """(rows ascending, cols, vals) entries as per-row padded arrays (value -inf, index -1)."""
    counts = torch.bincount(rows, minlength=qn)
    width = max(int(counts.max()) if rows.numel() else 0, 1)
    slot = torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows]
    out_v = torch.full((qn, width), -math.inf, dtype=dtype, device=rows.device)
    out_i = torch.full((qn, width), -1, dtype=torch.int64, device=rows.device)
    out_v[rows, slot] = vals
    out_i[rows, slot] = cols
    return out_v, out_i


def entries_above(block: torch.Tensor, seg_max: torch.Tensor | None, w: int, thr: torch.Tensor | None, k: int,
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
    return pad_rows(rows, cols + d0, vals, qn, block.dtype)
