"""Descriptor rows read block by block: the database side of a search, whatever its size.

A train split at competition scale does not fit in memory as float32 (GLDv2-clean: 1,580,470 x 512 per
model, 3.2 GB in float32, eight models; the recognition family descriptor is 1536-d). The store keeps
descriptors as float16 ``.npz`` files written uncompressed, so their ``embeddings`` member can be mapped
from disk and read a row range at a time. Every object here is a :class:`Rows`: ids plus
``block(r0, r1)``, the float32 rows ``r0:r1``, never more than that block in memory:

* :class:`ArrayRows` - an array already in memory;
* :class:`SplitRows` - ``STORE/<model>/<split>.npz`` read from disk, block by block (a compressed or
  otherwise unmappable file is read whole, in its stored dtype, with a warning);
* :class:`FamilyRows` - the recognition descriptor (per-family mean of the models, concatenated,
  L2-normalised, :mod:`kernel.postprocess.recognition`) computed block by block from the models' splits;
* :class:`EnsembleRows` - the two-stage ensemble descriptor (the models concatenated, scaled by
  1/sqrt(M)) computed block by block.

A block that holds NaN/inf or an all-zero row raises :class:`KernelError` naming the file and the first bad
id (:mod:`kernel.descriptor_checks`); a split stored in a non-float dtype is refused when opened.
Contiguous rows are read with one positioned read (nothing mapped); rows in another order through a
mapping dropped after every block, so reading a whole split leaves nothing resident. docs/scale.md
explains the memory budget this serves.
"""
from __future__ import annotations

import logging
import math
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from kernel.descriptor_checks import check_dtype, check_rows
from kernel.errors import KernelError
from kernel.store import read_ids

logger = logging.getLogger(__name__)

#: rows of one read from disk when a caller asks for more (bounds the stored-dtype copy per read)
READ_ROWS = 1 << 16


class Rows:
    """``ids`` (str array), ``dim`` and ``block(r0, r1)`` -> float32 (r1 - r0, dim) array."""

    ids: np.ndarray
    dim: int
    name: str = "rows"

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.ids), self.dim)

    def block(self, r0: int, r1: int) -> np.ndarray:
        raise NotImplementedError

    def blocks(self, rows: int):
        """``(r0, r1, block)`` over all rows, ``rows`` at a time."""
        for r0 in range(0, len(self), rows):
            r1 = min(len(self), r0 + rows)
            yield r0, r1, self.block(r0, r1)


class ArrayRows(Rows):
    """Rows of an in-memory (N, D) array of any float dtype."""

    def __init__(self, array: np.ndarray, ids=None, name: str = "array"):
        self.array = np.asarray(array)
        if self.array.ndim != 2:
            raise ValueError(f"expected a 2-d descriptor array, got shape {self.array.shape}")
        self.ids = np.asarray(ids if ids is not None else np.arange(len(self.array)).astype(str))
        self.dim, self.name = self.array.shape[1], name

    def block(self, r0: int, r1: int) -> np.ndarray:
        return self.array[r0:r1].astype(np.float32, copy=True)


def npz_member_layout(path: Path, member: str) -> tuple[int, np.dtype, tuple[int, ...]] | None:
    """``(byte offset, dtype, shape)`` of the raw array data of ``member`` (e.g. ``embeddings.npy``) inside
    an ``.npz``, when it is stored uncompressed in C order (what :func:`numpy.savez` writes); else None."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
        if local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        fh.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(fh)
        offset = fh.tell()
    if fortran or dtype.hasobject or len(shape) != 2:
        return None
    return offset, dtype, shape


class SplitRows(Rows):
    """One model's split, ``STORE/<model>/<split>.npz``, read from disk a block at a time.

    Only the ids (and, when aligned to another id order, one int64 position per row) stay in memory.
    """

    def __init__(self, path: str | Path, dim: int | None = None):
        self.path = Path(path)
        self.name = str(self.path)
        if not self.path.is_file():
            raise KernelError(f"{self.path}: descriptor file not found")
        try:
            self.ids = read_ids(self.path)
            self.layout = npz_member_layout(self.path, "embeddings.npy")
            self.memory = None
            if self.layout is None:
                logger.warning("%s: embeddings are compressed or not in C order: read whole into memory "
                               "(rewrite with numpy.savez to stream it)", self.path)
                with np.load(self.path, allow_pickle=False) as z:
                    self.memory = z["embeddings"]
        except KernelError:
            raise
        except Exception as exc:  # zip / truncated / not an npz
            raise KernelError(f"{self.path}: cannot read descriptor file ({type(exc).__name__}: {exc})") from None
        shape = self.memory.shape if self.memory is not None else self.layout[2]
        self._check(shape, dim)
        check_dtype(self.stored_dtype, str(self.path))
        if shape[0] == 0:
            logger.warning("%s: no descriptors: every prediction that needs this split will be empty", self.path)
        self.dim = int(shape[1])
        self.order: np.ndarray | None = None  # positions in the file of the rows, when aligned

    def _check(self, shape, dim) -> None:
        if len(shape) != 2:
            raise KernelError(f"{self.path}: embeddings must be 2-d (N x D), got shape {tuple(shape)}")
        if self.ids.ndim != 1 or len(self.ids) != shape[0]:
            raise KernelError(f"{self.path}: {len(self.ids)} ids but {shape[0]} embedding rows")
        if dim is not None and shape[1] != dim:
            raise KernelError(f"{self.path}: embeddings are {shape[1]}-d, expected {dim}-d")
        if pd.Index(self.ids).has_duplicates:  # hashing: seconds faster than sorting 1.6 M ids
            raise KernelError(f"{self.path}: ids are not unique")

    @property
    def stored_dtype(self) -> np.dtype:
        return self.memory.dtype if self.memory is not None else self.layout[1]

    def aligned_to(self, ref_ids: np.ndarray, ref_name: str) -> "SplitRows":
        """These rows in the order of ``ref_ids`` (the id sets must be equal); no copy of the data."""
        if len(ref_ids) == len(self.ids) and np.array_equal(ref_ids, self.ids):
            self.ids = ref_ids  # one copy of the ids for all the models
            return self
        pos = pd.Index(self.ids).get_indexer(ref_ids)
        if len(self.ids) != len(ref_ids) or (pos < 0).any():
            extra, missing = np.setdiff1d(self.ids, ref_ids), np.setdiff1d(ref_ids, self.ids)
            first = f"e.g. {missing[0]} missing" if len(missing) else f"e.g. {extra[0]} extra"
            raise KernelError(f"{self.path}: ids do not match {ref_name} "
                              f"({len(missing)} missing, {len(extra)} extra; {first})")
        out = object.__new__(SplitRows)
        out.__dict__.update(self.__dict__)
        out.ids, out.order = np.asarray(ref_ids), pos.astype(np.int64)
        return out

    def _read_span(self, r0: int, r1: int) -> np.ndarray:
        """File rows ``r0:r1`` in the stored dtype: one positioned read, nothing mapped."""
        if self.memory is not None:
            return self.memory[r0:r1]
        offset, dtype, shape = self.layout
        buf = np.empty((r1 - r0, shape[1]), dtype)
        with open(self.path, "rb", buffering=0) as fh:
            got = os.preadv(fh.fileno(), [memoryview(buf).cast("B")], offset + r0 * buf.itemsize * shape[1])
        if got != buf.nbytes:
            raise KernelError(f"{self.path}: truncated descriptor file (rows {r0}-{r1})")
        return buf

    def _read_into(self, out: np.ndarray, sel) -> None:
        """Rows ``sel`` (a slice, or sorted positions) into the float32 array ``out``."""
        if self.memory is not None:
            out[:] = self.memory[sel]
            return
        offset, dtype, shape = self.layout
        if isinstance(sel, slice):  # contiguous rows
            buf = self._read_span(sel.start, sel.stop)
        else:
            mm = np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=shape)
            buf = mm[sel]  # a copy: the mapping is dropped with ``mm``
            del mm
        torch.from_numpy(out).copy_(torch.from_numpy(buf))  # converted in one pass (torch: 3x numpy's speed)

    def subset(self, keep: np.ndarray) -> "SplitRows":
        """These rows where the boolean ``keep`` is true, in their order; no copy of the data."""
        out = object.__new__(SplitRows)
        out.__dict__.update(self.__dict__)
        pos = np.flatnonzero(keep)
        out.ids, out.order = self.ids[pos], (pos if self.order is None else self.order[pos]).astype(np.int64)
        return out

    def _read_positions(self, out: np.ndarray, pos: np.ndarray) -> None:
        """File rows ``pos`` (any order) into ``out``. Positions that are dense in their range (a view leaving a
        few ids out) are read as that one range and picked; sparse ones sorted, through a mapping."""
        if not len(pos):
            return
        lo, hi = int(pos.min()), int(pos.max()) + 1
        if hi - lo <= 2 * len(pos):  # picked in the stored dtype, converted in the same pass (torch)
            span = torch.from_numpy(np.ascontiguousarray(self._read_span(lo, hi)))
            torch.from_numpy(out).copy_(torch.index_select(span, 0, torch.from_numpy(pos - lo)))
            return
        srt = np.argsort(pos, kind="stable")
        part = np.empty((len(pos), self.dim), np.float32)
        self._read_into(part, pos[srt])
        out[srt] = part

    def block(self, r0: int, r1: int) -> np.ndarray:
        out = np.empty((r1 - r0, self.dim), np.float32)
        for s in range(r0, r1, READ_ROWS):
            e = min(r1, s + READ_ROWS)
            if self.order is None:
                self._read_into(out[s - r0 : e - r0], slice(s, e))
            else:
                self._read_positions(out[s - r0 : e - r0], self.order[s:e])
        return checked(out, self.ids[r0:r1], str(self.path))

    def rows_at(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (positions among these rows, any order) as float32."""
        out = np.empty((len(rows), self.dim), np.float32)
        self._read_positions(out, rows if self.order is None else self.order[rows])
        return checked(out, self.ids[rows], str(self.path))


def checked(out: np.ndarray, ids: np.ndarray, name: str) -> np.ndarray:
    """``out`` after one fast pass over its norms; :func:`check_rows` names the first bad row if any."""
    norms = torch.linalg.vector_norm(torch.from_numpy(out), dim=1)
    if not bool(torch.isfinite(norms).all()) or bool((norms == 0).any()):
        check_rows(ids, out, name)
    return out


class ViewRows(Rows):
    """The rows of a split view (:mod:`kernel.views`): each source file's rows without its left-out ids,
    concatenated; nothing is copied to disk and only the ids stay in memory."""

    def __init__(self, view, dim: int | None = None):
        self.path, self.name = view.path, str(view.path)
        self.parts = []
        for source, exclude in view.sources():
            rows = SplitRows(source, dim=dim)
            dim = rows.dim
            if exclude:
                rows = rows.subset(~np.isin(rows.ids, np.asarray(sorted(exclude), dtype=str)))
            self.parts.append(rows)
        self.dim = dim
        self.ids = np.concatenate([p.ids for p in self.parts])
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        if pd.Index(self.ids).has_duplicates:
            raise KernelError(f"{self.path}: an image is both shipped and added (ids are not unique)")
        self.order: np.ndarray | None = None  # positions among the concatenated rows, when aligned

    def aligned_to(self, ref_ids: np.ndarray, ref_name: str) -> "ViewRows":
        """These rows in the order of ``ref_ids`` (the id sets must be equal)."""
        if len(ref_ids) == len(self.ids) and np.array_equal(ref_ids, self.ids):
            return self
        pos = pd.Index(self.ids).get_indexer(ref_ids)
        if len(self.ids) != len(ref_ids) or (pos < 0).any():
            raise KernelError(f"{self.path}: ids do not match {ref_name} ({len(self.ids)} rows against "
                              f"{len(ref_ids)}; {int((pos < 0).sum())} of its ids missing)")
        out = object.__new__(ViewRows)
        out.__dict__.update(self.__dict__)
        out.ids, out.order = np.asarray(ref_ids), pos.astype(np.int64)
        return out

    def block(self, r0: int, r1: int) -> np.ndarray:
        if self.order is None:
            return stacked_block(self.parts, self.starts, self.dim, r0, r1)
        out = np.empty((r1 - r0, self.dim), np.float32)
        pos = self.order[r0:r1]
        part_of = np.searchsorted(self.starts, pos, side="right") - 1
        for k, part in enumerate(self.parts):
            mine = part_of == k
            if mine.any():
                out[mine] = part.rows_at(pos[mine] - self.starts[k])
        return out


def stacked_block(parts: list, starts: np.ndarray, dim: int, r0: int, r1: int) -> np.ndarray:
    """Rows ``r0:r1`` of ``parts`` read one after another (``starts``: their first rows): each part's overlap is a
    contiguous block of it; a range inside one part is that part's block as it is, no copy."""
    k = int(np.searchsorted(starts, r0, side="right")) - 1
    if r1 <= starts[k + 1]:
        return parts[k].block(r0 - starts[k], r1 - starts[k])
    out = np.empty((r1 - r0, dim), np.float32)
    for part, start in zip(parts, starts):
        a, b = max(r0, start), min(r1, start + len(part))
        if a < b:
            out[a - r0 : b - r0] = part.block(a - start, b - start)
    return out


def open_split(store, model: str, split: str, dim: int | None = None) -> Rows:
    """A model's database-side split as rows: its descriptor file, or its view (:mod:`kernel.views`)."""
    from kernel.store import split_path
    from kernel.views import read_view

    view = read_view(store, model, split)
    return ViewRows(view, dim) if view is not None else SplitRows(split_path(store, model, split), dim)


class FamilyRows(Rows):
    """Recognition descriptor rows: within each family the mean of its models' rows, families
    concatenated in the given order, L2-normalised when ``normalize`` (our reading, kept a parameter).

    ``families``: per family, the models' :class:`Rows`, all aligned to the same ids.
    """

    def __init__(self, families: list[list[Rows]], normalize: bool = True, name: str = "family descriptors"):
        self.families, self.normalize, self.name = families, normalize, name
        self.ids = families[0][0].ids
        self.dims = [fam[0].dim for fam in families]
        self.dim = sum(self.dims)

    def block(self, r0: int, r1: int) -> np.ndarray:
        # torch, in the order of kernel.postprocess.recognition.family_descriptors: the same bits
        out = torch.empty((r1 - r0, self.dim), dtype=torch.float32)
        off = 0
        for fam, d in zip(self.families, self.dims):
            acc = out[:, off : off + d]
            acc.copy_(torch.from_numpy(fam[0].block(r0, r1)))
            for rows in fam[1:]:
                acc += torch.from_numpy(rows.block(r0, r1))
            acc /= len(fam)
            off += d
        if self.normalize:
            out /= out.norm(dim=1, keepdim=True).clamp(min=1e-12)
        return out.numpy()


class EnsembleRows(Rows):
    """Two-stage ensemble rows: the models' rows concatenated, each scaled by 1/sqrt(M), so that the
    inner product of two such rows is the mean of the models' cosines."""

    def __init__(self, models: list[Rows], name: str = "ensemble descriptors"):
        self.models, self.name = models, name
        self.ids = models[0].ids
        self.dims = [m.dim for m in models]
        self.dim = sum(self.dims)

    def block(self, r0: int, r1: int) -> np.ndarray:
        out = np.empty((r1 - r0, self.dim), np.float32)
        scale = np.float32(1.0 / math.sqrt(len(self.models)))
        off = 0
        for rows, d in zip(self.models, self.dims):
            out[:, off : off + d] = rows.block(r0, r1) * scale
            off += d
        return out
