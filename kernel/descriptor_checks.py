"""Checks on descriptors read from a store, before a search or a cleaning trusts them.

Descriptors the kernel writes are L2-normalised float16/float32 rows. A store built elsewhere (or damaged)
can hold what no search should use silently: an integer or object dtype (``int8`` embeddings would be
compared as if they were normalised floats), non-finite values, all-zero rows (similarity 0 to everything,
ranked at random) or no rows at all (every answer empty). :func:`check_descriptors` refuses the first three
with a :class:`KernelError` naming the file, and warns about an empty split.
"""
from __future__ import annotations

import logging

import numpy as np

from kernel.errors import KernelError

log = logging.getLogger(__name__)

FLOAT_KINDS = ("float16", "float32", "float64")


def check_dtype(dtype, where: str) -> None:
    """Refuse descriptors stored in anything but a float dtype."""
    if np.dtype(dtype).name not in FLOAT_KINDS:
        raise KernelError(f"{where}: descriptors have dtype {np.dtype(dtype).name}; expected one of {', '.join(FLOAT_KINDS)}")


def check_rows(ids, emb: np.ndarray, where: str) -> None:
    """Refuse rows with NaN / infinite values or all zeros (``ids``: the ids of these rows)."""
    finite = np.isfinite(emb).all(axis=1)
    if not finite.all():
        raise KernelError(f"{where}: {int((~finite).sum())} descriptors hold NaN or infinite values "
                          f"(first: id {ids[int(np.argmin(finite))]})")
    zero = ~np.any(emb != 0, axis=1)
    if zero.any():
        raise KernelError(f"{where}: {int(zero.sum())} descriptors are all zeros (first: id {ids[int(np.argmax(zero))]}); "
                          "they would rank at random")


def check_descriptors(ids, embeddings, where: str) -> None:
    """Raise :class:`KernelError` (naming ``where``) unless ``embeddings`` is a 2-D float array with one
    finite, non-zero row per id; log a warning when it has no rows."""
    emb = np.asarray(embeddings)
    check_dtype(emb.dtype, where)
    if emb.ndim != 2 or emb.shape[0] != len(ids):
        raise KernelError(f"{where}: descriptors of shape {emb.shape} do not match {len(ids)} ids")
    if emb.shape[0] == 0:
        log.warning("%s: no descriptors: every prediction that needs this split will be empty", where)
        return
    check_rows(ids, emb, where)
