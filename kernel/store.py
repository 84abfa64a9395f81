"""The descriptor store: the one interface between extraction and post-processing.

Layout::

    STORE/<model_name>/meta.json            {"name", "family", "image_size", "sha256", "dim", ...}
    STORE/<model_name>/<split>.npz          ids (str, N) + embeddings (N x dim, L2-normalised rows)
    STORE/<model_name>/<split>.parts/       shards of an extraction still in progress (part-*.npz)
    STORE/failures/<split>.csv              images that could not be decoded: id,reason
    STORE/failures/<split>.shard-i-of-n.csv ... found by shard i of n of an offline extraction

Every write is atomic (write to a temporary file in the same folder, then ``os.replace``), so a crash
never leaves a half-written ``.npz``: a split file either exists complete or not at all. Extraction writes
shards while it runs and consolidates them into ``<split>.npz`` at the end; a resumed run reads the shards
back and skips the ids they hold (:func:`stored_ids`). Train / index descriptors computed offline
(``--shard i/n`` on many machines: shard i numbers its parts from ``i * PART_RANGE``) are merged the same way
(:func:`merge_parts`).
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from kernel.descriptor_checks import check_descriptors
from kernel.errors import KernelError
from kernel.files import atomic_write
from kernel.views import read_view, view_path

log = logging.getLogger(__name__)

META = "meta.json"
FAILURES_DIR = "failures"
PART_RANGE = 1_000_000  # part numbers of shard i are i*PART_RANGE + k (shards never collide)


def split_path(store: str | Path, model: str, split: str) -> Path:
    return Path(store) / model / f"{split}.npz"


def parts_dir(store: str | Path, model: str, split: str) -> Path:
    return Path(store) / model / f"{split}.parts"


def _save_npz(path: Path, ids, embeddings: np.ndarray) -> None:
    ids = np.asarray([str(i) for i in ids], dtype=str)
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or emb.shape[0] != len(ids):
        raise ValueError(f"{path}: embeddings shape {emb.shape} does not match {len(ids)} ids")
    atomic_write(path, lambda fh: np.savez(fh, ids=ids, embeddings=emb))


def save_split(store: str | Path, model: str, split: str, ids, embeddings: np.ndarray) -> Path:
    """Atomically write ``STORE/<model>/<split>.npz``."""
    path = split_path(store, model, split)
    _save_npz(path, ids, embeddings)
    return path


def _write_npy_member(zf, name: str, shape: tuple[int, ...], dtype, chunks) -> None:
    """Write ``name`` (a .npy) into an open ZipFile, uncompressed, its data taken from ``chunks`` (arrays
    of ``dtype`` whose rows, in order, make up ``shape``) without holding the whole array."""
    import zipfile

    dtype = np.dtype(dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    rows = 0
    with zf.open(name, "w", force_zip64=True) as fh:
        np.lib.format.write_array_header_2_0(fh, header)
        for c in chunks:
            c = np.ascontiguousarray(c, dtype=dtype)
            fh.write(c.tobytes())
            rows += len(c)
    if rows != (shape[0] if shape else 1):
        raise ValueError(f"{name}: {rows} rows written, {shape[0]} declared")
    assert zf.getinfo(name).compress_type == zipfile.ZIP_STORED


def save_npz_streamed(path: Path, ids, dim: int, dtype, blocks, **extra: np.ndarray) -> Path:
    """Atomically write a descriptor ``.npz`` (``ids`` + ``embeddings`` (len(ids) x dim) in ``dtype``) whose
    embeddings come from ``blocks`` (an iterable of row blocks, in order), never all in memory; ``extra``
    arrays (small, per row) are stored beside them. The file is what :func:`numpy.savez` writes, so it
    streams back with :class:`kernel.rows.SplitRows`."""
    import zipfile

    ids = np.asarray([str(i) for i in ids], dtype=str)

    def write(fh):
        with zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            _write_npy_member(zf, "ids.npy", ids.shape, ids.dtype, [ids])
            _write_npy_member(zf, "embeddings.npy", (len(ids), dim), dtype, blocks)
            for key, arr in extra.items():
                arr = np.asarray(arr)
                _write_npy_member(zf, f"{key}.npy", arr.shape, arr.dtype, [arr] if arr.ndim else [arr.reshape(1)])

    atomic_write(Path(path), write)
    return Path(path)


@contextmanager
def _descriptor_file(path: Path):
    """The open ``np.load`` of a descriptor file; :class:`KernelError` naming the file when it is unreadable
    or lacks ``ids`` or ``embeddings``."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if "ids" not in z or "embeddings" not in z:
                raise KernelError(f"{path}: descriptor file must hold 'ids' and 'embeddings' (has {list(z.keys())})")
            yield z
    except KernelError:
        raise
    except Exception as exc:  # zip / pickle / truncated file
        raise KernelError(f"{path}: cannot read descriptor file ({type(exc).__name__}: {exc})") from None


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with _descriptor_file(path) as z:
        return z["ids"].astype(str), z["embeddings"]


def read_ids(path: str | Path) -> np.ndarray:
    """The ids (str) of a descriptor file, reading only that member, never the embeddings.

    Raises :class:`KernelError` naming the file when it is unreadable or not a descriptor file.
    """
    with _descriptor_file(Path(path)) as z:
        return z["ids"].astype(str)


def load_split(
    store: str | Path, model: str, split: str, dtype=np.float32, dim: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate ``STORE/<model>/<split>.npz``; returns ``(ids, embeddings)``.

    Raises :class:`KernelError` naming the file when it is missing or unreadable, when the ids are not
    unique, the embeddings are not 2-d (or not ``dim`` wide), the counts disagree, or a row is NaN/inf.
    """
    path = split_path(store, model, split)
    view = read_view(store, model, split)
    if view is not None:
        ids, emb, path = *_read_view(view), view.path
    elif not path.is_file():
        raise KernelError(f"{path}: missing split '{split}' for model '{model}'")
    else:
        ids, emb = _read_npz(path)
    if emb.ndim != 2:
        raise KernelError(f"{path}: embeddings must be 2-d (N x D), got shape {emb.shape}")
    if ids.ndim != 1 or len(ids) != emb.shape[0]:
        raise KernelError(f"{path}: {len(ids)} ids but {emb.shape[0]} embedding rows")
    if dim is not None and emb.shape[1] != dim:
        raise KernelError(f"{path}: embeddings are {emb.shape[1]}-d, expected {dim}-d")
    if len(np.unique(ids)) != len(ids):
        raise KernelError(f"{path}: ids are not unique")
    check_descriptors(ids, emb, str(path))  # float dtype, finite, no all-zero row; warns when empty
    return ids, emb.astype(dtype, copy=False)


def _read_view(view) -> tuple[np.ndarray, np.ndarray]:
    """A view's ids and rows in memory (small splits: the in-memory search path): each source without its
    left-out ids, in order."""
    ids, embs = [], []
    for path, exclude in view.sources():
        i, e = _read_npz(path)
        keep = ~np.isin(i, np.asarray(sorted(exclude), dtype=str)) if exclude else slice(None)
        ids.append(i[keep])
        embs.append(e[keep])
    widths = {e.shape[1] for e in embs if e.ndim == 2}
    if len(widths) > 1:
        raise KernelError(f"{view.path}: its descriptor files differ in width ({sorted(widths)})")
    return np.concatenate(ids), np.concatenate(embs)


def has_split(store: str | Path, model: str, split: str) -> bool:
    """A complete split: its descriptor file, or a view of shipped descriptors (:mod:`kernel.views`)."""
    return split_path(store, model, split).is_file() or view_path(store, model, split).is_file()


def model_meta(entry: dict, sha256: str | None, dtype: str | None, dim: int) -> dict:
    """The ``meta.json`` of a model's descriptors: what the manifest ``entry`` says of the model, the
    checkpoint's ``sha256`` (None when unknown), the stored ``dtype`` ("float16"/"float32", None when
    unknown) and the descriptor width ``dim``."""
    return {"name": entry["name"], "family": entry["family"], "image_size": entry["image_size"],
            "sha256": sha256, "checkpoint": entry["checkpoint"], "tracks": entry.get("tracks", []),
            "backbone": entry.get("backbone"), "dim": dim, "dtype": dtype}


def write_meta(store: str | Path, model: str, meta: dict) -> Path:
    path = Path(store) / model / META
    data = json.dumps(meta, indent=2, sort_keys=True).encode()
    atomic_write(path, lambda fh: fh.write(data))
    return path


def read_meta(store: str | Path, model: str) -> dict:
    path = Path(store) / model / META
    if not path.is_file():
        raise KernelError(f"{path}: missing meta.json for model '{model}'")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise KernelError(f"{path}: not valid JSON ({exc})") from None
    for field in ("name", "family"):
        if field not in meta:
            raise KernelError(f"{path}: field '{field}' is missing")
    return meta


def make_writable(store: str | Path) -> Path:
    """Create the store folder when it is missing; :class:`KernelError` when it cannot be created or
    written to."""
    store = Path(store)
    try:
        store.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KernelError(f"{store}: cannot create the descriptor store ({exc.strerror or exc})") from None
    if not os.access(store, os.W_OK):
        raise KernelError(f"{store}: the descriptor store is not writable")
    return store


def list_models(store: str | Path) -> list[str]:
    """Models that have a meta.json in the store, sorted by name."""
    root = Path(store)
    if not root.is_dir():
        raise KernelError(f"{root}: descriptor store not found")
    return sorted(p.parent.name for p in root.glob(f"*/{META}"))


# ---------------------------------------------------------------- shards (resumable extraction)

def write_part(store: str | Path, model: str, split: str, index: int, ids, embeddings: np.ndarray) -> Path:
    """Atomically write one shard of an extraction in progress."""
    path = parts_dir(store, model, split) / f"part-{index:06d}.npz"
    _save_npz(path, ids, embeddings)
    return path


def read_parts(store: str | Path, model: str, split: str) -> tuple[np.ndarray, np.ndarray | None, int]:
    """All shards written so far: ``(ids, embeddings or None, next_part_index)``.

    A shard that cannot be read (e.g. the disk filled up) is skipped; its ids are simply recomputed.
    """
    d = parts_dir(store, model, split)
    ids, embs, nxt = [], [], 0
    for p in sorted(d.glob("part-*.npz")) if d.is_dir() else []:
        nxt = max(nxt, int(p.stem.split("-")[1]) + 1)
        try:
            i, e = _read_npz(p)
        except KernelError:
            continue
        ids.append(i)
        embs.append(e)
    if not ids:
        return np.zeros(0, dtype=str), None, nxt
    return np.concatenate(ids), np.concatenate(embs), nxt


def part_offset(shard: tuple[int, int] | None) -> int:
    """The first part number of shard ``(i, n)`` (0 without a shard): each shard writes in its own range."""
    return 0 if shard is None else shard[0] * PART_RANGE


def next_part(store: str | Path, model: str, split: str, offset: int) -> int:
    """The next free part number in ``offset .. offset + PART_RANGE`` (the range of one shard)."""
    d = parts_dir(store, model, split)
    nums = [int(m.group(1)) for p in (d.glob("part-*.npz") if d.is_dir() else [])
            if (m := re.fullmatch(r"part-(\d+)", p.stem))]
    mine = [n for n in nums if offset <= n < offset + PART_RANGE]
    return max(mine) + 1 if mine else offset


def stored_ids(store: str | Path, model: str, split: str) -> set[str]:
    """Ids a model already has for the split: in ``<split>.npz`` and in readable shards (an unreadable
    shard is skipped with a warning, as :func:`read_parts` does: its ids are computed again)."""
    done = set()
    pdir = parts_dir(store, model, split)
    for p in sorted(pdir.glob("part-*.npz")) if pdir.is_dir() else []:
        try:
            done.update(read_ids(p).tolist())
        except KernelError as exc:
            log.warning("%s (its descriptors will be computed again)", exc)
    if split_path(store, model, split).is_file():
        done.update(read_ids(split_path(store, model, split)).tolist())
    return done


def discard_descriptors(store: str | Path, model: str, split: str) -> None:
    """Remove a model's ``<split>.npz`` and its shards (``extract --overwrite``)."""
    split_path(store, model, split).unlink(missing_ok=True)
    pdir = parts_dir(store, model, split)
    for p in pdir.glob("part-*.npz") if pdir.is_dir() else []:
        p.unlink()


def merge_parts(store: str | Path, model: str, split: str, dtype) -> Path:
    """Merge the shards and a previous ``<split>.npz`` (its ids are kept) into ``<split>.npz``, sorted by id;
    the stored descriptors are read in ``dtype``."""
    for tmp in parts_dir(store, model, split).glob(".part-*.tmp"):  # a write killed half-way
        tmp.unlink()
    if split_path(store, model, split).is_file():  # a view is not merged into: it stays a view
        ids, emb = load_split(store, model, split, dtype=dtype)
        write_part(store, model, split, next_part(store, model, split, PART_RANGE * 999), ids, emb)
    return consolidate(store, model, split, order=sorted(stored_ids(store, model, split)))


def consolidate(store: str | Path, model: str, split: str, order=None) -> Path:
    """Merge the shards into ``<split>.npz`` (optionally in the id order given) and remove them."""
    ids, emb, _ = read_parts(store, model, split)
    if emb is None:
        raise KernelError(f"{parts_dir(store, model, split)}: no shards to consolidate")
    # a resumed run may have recomputed ids of an unreadable shard: keep the first occurrence
    _, first = np.unique(ids, return_index=True)
    keep = np.sort(first)
    ids, emb = ids[keep], emb[keep]
    if order is not None:
        pos = {k: n for n, k in enumerate(ids)}
        sel = [pos[str(k)] for k in order if str(k) in pos]
        ids, emb = ids[sel], emb[sel]
    path = save_split(store, model, split, ids, emb)
    # shards, and temporary files a killed write may have left behind
    for p in parts_dir(store, model, split).iterdir():
        p.unlink()
    parts_dir(store, model, split).rmdir()
    return path


# ---------------------------------------------------------------- failures (broken images)

def failures_path(store: str | Path, split: str) -> Path:
    return Path(store) / FAILURES_DIR / f"{split}.csv"


def failures_name(split: str, shard: tuple[int, int] | None) -> str:
    """The failure file's name of a split, or of one shard of it (``<split>.shard-i-of-n``)."""
    return split if shard is None else f"{split}.shard-{shard[0]}-of-{shard[1]}"


def _shard_failure_files(store: str | Path, split: str) -> list[Path]:
    folder = failures_path(store, split).parent
    return sorted(folder.glob(f"{split}.shard-*-of-*.csv")) if folder.is_dir() else []


def read_all_failures(store: str | Path, split: str) -> dict[str, str]:
    """Failures of the split, including those written by shards (``<split>.shard-i-of-n.csv``)."""
    out = {}
    for p in _shard_failure_files(store, split):
        out.update(read_failures(store, p.stem))
    out.update(read_failures(store, split))
    return out


def drop_merged_failure_files(store: str | Path, split: str) -> None:
    """After a merge: remove ``failures/<split>.shard-i-of-n.csv`` whose every row is in ``<split>.csv``."""
    merged = read_failures(store, split)
    for p in _shard_failure_files(store, split):
        if read_failures(store, p.stem).items() <= merged.items():
            p.unlink()


def write_failures(store: str | Path, split: str, failures: dict[str, str]) -> Path:
    """Atomically write ``id,reason`` rows for images that could not be decoded."""
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "reason"])
    for k in sorted(failures):
        w.writerow([k, failures[k]])
    data = buf.getvalue().encode()
    path = failures_path(store, split)
    atomic_write(path, lambda fh: fh.write(data))
    return path


def read_failures(store: str | Path, split: str) -> dict[str, str]:
    path = failures_path(store, split)
    if not path.is_file():
        return {}
    with open(path, newline="") as fh:
        return {row["id"]: row["reason"] for row in csv.DictReader(fh)}
