"""The database side of post-processing: train, index and bank rows, their k-NN labels and B(t).

Everything here is test-independent. Each piece comes from a prepared artefact
(:mod:`kernel.postprocess.prepared`, written by ``python -m kernel prepare``) when one matches the
current inputs. Otherwise it is computed from the models' splits, streamed block by block
(:mod:`kernel.rows`), and saved to the run's cache (:class:`Reuse`) so that it is computed once.
Fingerprints are computed lazily (:data:`Fingerprint`): hashing every model's ids costs about a second
per 1.58 M rows, worth paying only when an artefact file is there to compare or one is saved.
:mod:`kernel.postprocess.pipeline` and :mod:`kernel.prepare` both build on these functions.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from kernel.errors import KernelError
from kernel.postprocess import prepared
from kernel.postprocess import recognition as rec
from kernel.files import NoSpaceError, free_bytes, has_room
from kernel.rows import FamilyRows, SplitRows

logger = logging.getLogger(__name__)

FAMILY_ORDER = ("dolg", "hybrid", "effnet")

#: an artefact's fingerprint (:func:`kernel.postprocess.prepared.fingerprint`), computed on the first call
#: and remembered (:func:`lazy`)
Fingerprint = Callable[[], dict]


def lazy(compute: Callable, *args) -> Callable:
    """``compute(*args)``, evaluated on the first call only and remembered."""
    return functools.cache(functools.partial(compute, *args))


def codes(values, codes_of: dict) -> np.ndarray:
    """Integer codes of landmark ids (str), shared across models through ``codes_of`` (new ids appended);
    an empty string (no label) is ``-1``."""
    inverse, uniq = pd.factorize(pd.Series(values, dtype=object).astype(str), sort=False)
    table = np.asarray([codes_of.setdefault(v, len(codes_of)) if v != "" else -1 for v in uniq], np.int64)
    return table[inverse] if len(inverse) else np.zeros(0, np.int64)


def landmarks_of(codes: np.ndarray, codes_of: dict) -> np.ndarray:
    """Inverse of :func:`codes`: landmark id strings of codes (``-1`` -> "")."""
    names = np.empty(len(codes_of) + 1, dtype=object)
    names[-1] = ""
    for v, c in codes_of.items():
        names[c] = v
    return names[np.asarray(codes, np.int64)].astype(str)


def train_codes(ids: np.ndarray, labels: pd.Series, path: Path, codes_of: dict) -> np.ndarray:
    """Integer landmark codes of train ids (codes shared across models through ``codes_of``)."""
    lab = labels.reindex(ids)
    if lab.isna().any():
        missing = ids[lab.isna().to_numpy()]
        raise KernelError(f"{path}: {len(missing)} train ids have no landmark_id in the train labels (first: {missing[0]})")
    return codes(lab.to_numpy(), codes_of)


@dataclass
class Reuse:
    """Where prepared artefacts are looked up (``dirs``, first match wins) and where the ones computed
    in this run are saved for the next (``cache``, e.g. predict's working folder; None: nowhere)."""

    dirs: list = field(default_factory=list)
    cache: Path | None = None

    @classmethod
    def of(cls, store_dir, prepared_dirs=None, cache_dir=None) -> "Reuse":
        dirs = [Path(d) for d in (prepared_dirs if prepared_dirs is not None else [prepared.prepared_dir(store_dir)])]
        cache = Path(cache_dir) if cache_dir else None
        return cls(dirs + ([cache] if cache and cache not in dirs else []), cache)

    def find(self, name: str, fp: Fingerprint) -> Path | None:
        """The first ``<dir>/<name>`` whose fingerprint is ``fp()``; ``fp`` is evaluated only when some
        folder holds a file of that name."""
        if not any((Path(d) / name).is_file() for d in self.dirs):
            return None
        return prepared.find(self.dirs, name, fp())

    def save(self, name: str, fp: Fingerprint, ids, **arrays) -> None:
        """Write an artefact to the cache (``fp`` evaluated then); nothing without a cache."""
        if self.cache is None:
            return
        needed = sum(np.asarray(a).nbytes for a in arrays.values()) + 64 * len(ids)
        if not has_room(self.cache, needed):
            logger.warning("%s: %d bytes free, %s needs about %d: not cached (computed again when needed)",
                           self.cache, free_bytes(self.cache), name, needed)
            return
        try:
            self.cache.mkdir(parents=True, exist_ok=True)
            prepared.write(self.cache / name, fp(), ids, **arrays)
        except NoSpaceError as exc:  # a cache is worth less than the run: keep going
            logger.warning("%s (not cached: computed again when needed)", exc)


def pass_bytes(memory_gb: float | None) -> int | None:
    """Bytes of one pass over a streamed database for a process budget of ``memory_gb``: a sixteenth of
    it (the pass in float32, its bfloat16 copy, the score blocks and the per-row arrays fit well inside),
    between 64 MiB and 1 GiB. ``None``: the search's default (512 MiB)."""
    if memory_gb is None:
        return None
    return int(min(1 << 30, max(64 << 20, memory_gb * (1 << 30) / 16)))


def labels_artefact(reuse: Reuse, name: str, fp: Fingerprint, ids: np.ndarray, codes_of: dict, compute):
    """k-NN (labels, conf) of database rows ``ids``: from a prepared artefact when one matches ``fp``,
    else ``compute()`` (saved to the cache)."""
    path = reuse.find(name, fp)
    if path is not None:
        a_ids, lms, conf = prepared.load_arrays(path, "ids", "landmarks", "conf")
        pos = pd.Index(a_ids.astype(str)).get_indexer(ids)
        if (pos < 0).any():
            raise KernelError(f"{path}: ids do not match the store although the fingerprint does")
        return codes(lms[pos], codes_of), conf[pos].astype(np.float32)
    lab, conf = compute()
    reuse.save(name, fp, ids, landmarks=landmarks_of(lab, codes_of), conf=conf)
    return lab, conf


def labels_fingerprint(labels: pd.Series | None) -> Callable[[], str | None]:
    """The train labels' digest (:func:`kernel.postprocess.prepared.labels_digest`), computed on first
    use; ``None`` without labels."""
    return lazy(prepared.labels_digest, labels) if labels is not None else lambda: None


def knn_fingerprint(kind: str, splits, p: dict, labels_fp: Callable[[], str | None]) -> Fingerprint:
    """Fingerprint of k-NN labels of the index computed by ``splits`` against their train splits
    (``labels_fp``: :func:`labels_fingerprint`)."""
    def compute() -> dict:
        models = [prepared.model_fingerprint(ms.meta, ms.store, ("index", "train")) for ms in splits]
        return prepared.fingerprint(kind, models, {"knn_k": p["knn_k"], "conf_divisor": p["conf_divisor"]},
                                    labels=labels_fp())

    return lazy(compute)


def aligned_rows(splits, split: str) -> list:
    """Every model's ``split`` as rows in the order of the first model's ids (the id sets must agree)."""
    first = splits[0].rows(split)
    return [first] + [ms.rows(split).aligned_to(first.ids, str(first.path)) for ms in splits[1:]]


def family_order(families: dict) -> list[str]:
    known = [f for f in FAMILY_ORDER if f in families]
    return known + sorted(f for f in families if f not in FAMILY_ORDER)


def check_family_dims(groups, dims) -> None:
    for g, fam in zip(groups, dims):
        widths = {ms.name: d for ms, d in zip(g, fam)}
        if len(set(widths.values())) > 1:
            raise KernelError(
                f"models of family '{g[0].meta['family']}' have different descriptor widths: "
                + ", ".join(f"{k} {v}-d" for k, v in widths.items())
            )


def family_rows(groups, split: str, normalize: bool) -> FamilyRows:
    """Family descriptor rows of a database-side split, streamed (every model must hold the same ids)."""
    flat = aligned_rows([ms for g in groups for ms in g], split)
    it = iter(flat)
    fams = [[next(it) for _ in g] for g in groups]
    check_family_dims(groups, [[r.dim for r in fam] for fam in fams])
    return FamilyRows(fams, normalize=normalize, name=f"{split} family descriptors")


def recognition_fingerprint(kind: str, groups, splits: tuple[str, ...], params: dict) -> dict:
    models = [prepared.model_fingerprint(ms.meta, ms.store, splits) for g in groups for ms in g]
    return prepared.fingerprint(kind, models, params)


def recognition_reference(groups, with_bank: bool, p: dict, reuse: Reuse, kw: dict):
    """(train rows, bank rows or None, B(t) or None): prepared artefacts when they match, else streamed
    from the models' splits (B(t) then computed and saved to the cache)."""
    fam = {"renormalize": p["renormalize"]}
    fp = lazy(recognition_fingerprint, "recognition-train", groups, ("train",), fam)
    train_path = reuse.find("recognition_train.npz", fp)
    if not with_bank:
        return SplitRows(train_path) if train_path else family_rows(groups, "train", p["renormalize"]), None, None
    fp = lazy(recognition_fingerprint, "recognition-bank", groups, ("nonlandmark",), fam)
    path = reuse.find("recognition_bank.npz", fp)
    bank = SplitRows(path) if path else family_rows(groups, "nonlandmark", p["renormalize"])
    if train_path is None:  # the train set changed at run time: the shipped rows of the images still present
        from kernel.postprocess.rowreuse import reuse_train

        reused = reuse_train(groups, p, reuse, bank, kw)
        if reused is not None:
            return reused[0], bank, reused[1]
    train = SplitRows(train_path) if train_path else family_rows(groups, "train", p["renormalize"])
    fp = lazy(recognition_fingerprint, "recognition-bias", groups, ("train", "nonlandmark"),
              {**fam, "bank_k_train": p["bank_k_train"]})
    path = reuse.find("recognition_bias.npz", fp)
    if path is not None:
        ids, bias = prepared.load_arrays(path, "ids", "bias")
        if not np.array_equal(ids.astype(str), train.ids):
            raise KernelError(f"{path}: ids do not match the train descriptors although the fingerprint does")
        return train, bank, bias.astype(np.float32)
    logger.info("B(t): %d train images against a bank of %d", len(train), len(bank))
    bias = rec.bank_similarity(train, bank, p["bank_k_train"], desc="B(train)", **kw)
    reuse.save("recognition_bias.npz", fp, train.ids, bias=bias)
    return train, bank, bias
