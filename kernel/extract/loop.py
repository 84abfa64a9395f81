"""Descriptor extraction: one pass over a split's images feeding every model, into the descriptor store.

    python -m kernel extract --manifest M --weights W --images SRC --split NAME --store S [--models a,b]

How the loop works (:func:`extract`):

- Every image is decoded once, in ``DataLoader`` worker processes (one per CPU core), and resized there once
  per distinct model input size (cv2 INTER_LINEAR). Only uint8 crosses to the device (pinned memory on CUDA);
  normalisation (ImageNet mean/std) happens on the device, once per size, shared by the models of that size.
- The models of a *group* are held at the same time and all fed from the same decoded batch. By default a
  group is every model that fits in half the device memory (so on Kaggle's P100 the whole ensemble is one
  pass); ``group_size`` forces a number (1 = model by model: the images are decoded once per model).
- On CUDA: fp16 autocast, channels_last, cudnn autotuning, a batch size per model that halves on
  out-of-memory and stays halved; a NaN/inf guard recomputes the affected items in fp32 (the hybrid models
  overflow in fp16, SPEC §1) and switches a model to fp32 for good when most of its items need it.
  On a CPU-only machine the same loop runs in fp32.
- Broken images (missing, empty, truncated, not an image, too large) never stop the run: they are written
  with their reason to ``STORE/failures/<split>.csv`` and counted in the summary; known failures are not
  retried on resume (``retry_failures`` to force).
- Finished work survives: descriptors are written as atomic shards (``STORE/<model>/<split>.parts/``) every
  ``flush_images`` images or ``flush_seconds`` seconds, on a deadline, on Ctrl-C and on any error. A new run
  skips every id already in a shard or in ``<split>.npz``; when a model's split is complete the shards are
  consolidated into ``<split>.npz`` (in id order). A completed split is never recomputed.
- Every visible GPU is used: with more than one device (and at least a few batches each) the call runs one
  worker process per device on an interleaved share of the images and merges their shards at the end, exactly
  as the ``shard`` recipe below does (:mod:`kernel.multidevice`).
- Offline train/index extraction on many machines: ``shard=(i, n)`` (``--shard i/n``, or torchrun's
  RANK/WORLD_SIZE) takes every n-th image, writes its shards in its own part-number range and failures to
  ``failures/<split>.shard-i-of-n.csv``, and never consolidates. Copy the ``.parts`` folders and failure files
  of all shards into one store and run once more without a shard: nothing is left to compute, the shards
  are merged into ``<split>.npz``.
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kernel import store as kstore
from kernel.errors import KernelError

log = logging.getLogger(__name__)

HELP = "extract descriptors of a split's images with the ensemble's models into the descriptor store"

PART_RANGE = 1_000_000  # part numbers of shard i are i*PART_RANGE + k (shards never collide)
DEFAULT_BATCH = {"cuda": 32, "cpu": 8}


# ----------------------------------------------------------------------------------------------- results

@dataclass
class Progress:
    """What ``on_batch`` receives after every batch: enough to project the rest of the run."""

    done: int  # images handled in this call so far (decoded or failed), over all groups
    total: int  # images this call has to handle, over all groups
    seconds: float  # wall seconds since the call started
    model_seconds: dict  # model name -> seconds spent in its forward passes so far

    @property
    def images_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


@dataclass
class ExtractSummary:
    """The result of :func:`extract`."""

    split: str
    images: int  # records of the split (of this shard)
    models: list  # model names, in the order given
    computed: dict = field(default_factory=dict)  # model -> descriptors computed in this call
    present: dict = field(default_factory=dict)  # model -> descriptors already in the store before
    model_seconds: dict = field(default_factory=dict)  # model -> seconds in forward passes (summed over devices)
    failures: dict = field(default_factory=dict)  # id -> reason, every known failure of these records
    new_failures: int = 0  # failures found in this call
    decode_wait: float = 0.0  # seconds the loop waited for decoded batches (decoding starved the device)
    seconds: float = 0.0
    complete: bool = False  # every model has every (decodable) record
    stopped: str = ""  # why the call ended early ("deadline", "max_batches"), empty when it ran to the end
    device: str = ""  # "cuda:0,cuda:1" when the call ran one worker process per device
    fp32_recomputed: dict = field(default_factory=dict)  # model -> items recomputed in fp32 (NaN guard)

    def images_per_s(self, model: str) -> float:
        s = self.model_seconds.get(model, 0.0)
        return self.computed.get(model, 0) / s if s > 0 else 0.0

    def line(self) -> str:
        """The one-line summary printed at the end of ``python -m kernel extract``."""
        status = "complete" if self.complete else f"INCOMPLETE ({self.stopped or 'not finished'}, resumable)"
        parts = [f"extract {self.split}: {self.images} images, {len(self.failures)} failures "
                 f"({self.new_failures} new), {self.seconds:.1f} s on {self.device}, {status}"]
        if self.failures:
            first = min(self.failures)
            parts.append(f"first failure {first}: {self.failures[first]}")
        for m in self.models:
            if self.computed.get(m):
                parts.append(f"{m} {self.computed[m]} in {self.model_seconds.get(m, 0.0):.1f} s "
                             f"({self.images_per_s(m):.1f} img/s)")
            else:
                parts.append(f"{m} {self.present.get(m, 0)} already stored")
        return "; ".join(parts)


# ----------------------------------------------------------------------------------------------- one model

def is_oom(exc: BaseException) -> bool:
    """An out-of-memory error of the device (CUDA) or of the host allocator."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


class ModelRunner:
    """One model on one device: sub-batches of ``batch_size`` with out-of-memory back-off, autocast, and the
    NaN/inf guard. ``runner(x)`` takes a normalised float batch (n, 3, S, S) on the device and returns the
    L2-normalised float32 descriptors (n, D) on the CPU."""

    def __init__(self, model: torch.nn.Module, name: str, device, batch_size: int, precision: str = "fp32"):
        if precision not in ("fp32", "fp16", "bf16"):
            raise KernelError(f"precision must be fp32, fp16 or bf16 (got {precision!r})")
        self.model, self.name, self.device = model, name, torch.device(device)
        self.batch_size = max(1, int(batch_size))
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        self.seconds = 0.0
        self.items = 0
        self.recomputed = 0  # items recomputed in fp32 by the NaN guard
        self._guard_batches = 0

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            if self.amp_dtype is not None:
                with torch.autocast(self.device.type, dtype=self.amp_dtype):
                    out = self.model(x)
                out = out.float()
                bad = ~torch.isfinite(out).all(dim=1)
                if bool(bad.any()):
                    n = int(bad.sum())
                    self.recomputed += n
                    self._guard_batches += 1
                    log.debug("%s: %d of %d descriptors non-finite in %s; recomputing in fp32",
                              self.name, n, len(out), self.amp_dtype)
                    out[bad] = self.model(x[bad]).float()
                    if self._guard_batches >= 3 and self.recomputed > 0.5 * (self.items + len(x)):
                        log.warning("%s: %d of %d items overflowed in %s; running it in fp32 from now on",
                                    self.name, self.recomputed, self.items + len(x), self.amp_dtype)
                        self.amp_dtype = None
            else:
                out = self.model(x).float()
            bad = ~torch.isfinite(out).all(dim=1)
            if bool(bad.any()):
                raise KernelError(f"model '{self.name}' gives non-finite descriptors in fp32 for "
                                  f"{int(bad.sum())} of {len(out)} images: its checkpoint is broken")
            return F.normalize(out, dim=1).cpu()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        outs, start = [], 0
        while start < len(x):
            bs = self.batch_size
            try:
                outs.append(self._forward(x[start:start + bs]))
                start += bs
                continue
            except Exception as exc:
                if not is_oom(exc):
                    raise
            # out of the except block: the failed call's frames (and their tensors) are released now
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if bs == 1:
                raise KernelError(f"model '{self.name}' does not fit in {self.device} memory even at "
                                  f"batch size 1: use a smaller group (--group-size 1)")
            self.batch_size = bs // 2
            log.warning("%s: out of memory at batch size %d on %s; retrying with %d",
                        self.name, bs, self.device, self.batch_size)
        self.items += len(x)
        self.seconds += time.perf_counter() - t0
        return torch.cat(outs) if outs else torch.zeros(0, 0)


# ----------------------------------------------------------------------------------------------- helpers

def resolve_device(device=None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise KernelError(f"--device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KernelError(f"--device {device}: CUDA is not available on this machine")
    return dev


def _device_memory(device: torch.device) -> int:
    """Bytes the models may take: half the GPU's memory, or half of the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 2
    try:
        with open("/proc/meminfo") as fh:
            info = dict(line.split(":", 1) for line in fh)
        return int(info["MemAvailable"].split()[0]) * 1024 // 2
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def model_bytes(entry: dict, weights_dir) -> int:
    """The memory one model's weights take (built on the meta device: nothing is allocated); falls back
    to the checkpoint's file size."""
    from kernel.models import build_model

    try:
        with torch.device("meta"):
            m = build_model(entry)
        return sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
    except Exception:  # a backbone that cannot be built on meta: the file is an upper bound
        p = Path(weights_dir) / entry["checkpoint"]
        return p.stat().st_size if p.is_file() else 0


def plan_groups(entries: list[dict], weights_dir, device, group_size: int | None = None) -> list[list[dict]]:
    """Split the models into groups held at the same time (most valuable first, SPEC ``priority``).

    ``group_size``: models per group; ``None``: as many as fit in half the device memory (weights only:
    activations of one batch of one model at a time come on top).
    """
    order = sorted(entries, key=lambda e: e.get("priority", 0))
    if group_size is not None:
        if group_size < 1:
            raise KernelError(f"--group-size must be >= 1 (got {group_size})")
        return [order[i:i + group_size] for i in range(0, len(order), group_size)]
    if len(order) <= 1:
        return [order] if order else []
    budget = _device_memory(torch.device(device))
    groups, used = [[]], 0
    for e in order:
        b = model_bytes(e, weights_dir)
        if groups[-1] and used + b > budget:
            groups.append([])
            used = 0
        groups[-1].append(e)
        used += b
    if len(groups) > 1:
        log.info("models do not all fit at once (%.1f GB for weights): %d groups, images decoded once per group",
                 budget / 1e9, len(groups))
    return groups


def _checkpoint_sha(entry: dict, weights_dir) -> str | None:
    if entry.get("sha256"):
        return entry["sha256"]
    path = Path(weights_dir) / entry["checkpoint"]
    if not path.is_file():
        return None
    from kernel.models import sha256_file

    return sha256_file(path)


def _meta_for(entry: dict, sha: str | None, dtype: str) -> dict:
    return {"name": entry["name"], "family": entry["family"], "image_size": entry["image_size"],
            "sha256": sha, "checkpoint": entry["checkpoint"], "group": entry.get("group", entry["family"]),
            "tracks": entry.get("tracks", []), "backbone": entry.get("backbone"),
            "dim": entry.get("embedding_dim", 512), "dtype": dtype}


def _failures_name(split: str, shard: tuple[int, int] | None) -> str:
    return split if shard is None else f"{split}.shard-{shard[0]}-of-{shard[1]}"


def _read_all_failures(store, split: str) -> dict[str, str]:
    """Failures of the split, including those written by shards (``<split>.shard-i-of-n.csv``)."""
    out = {}
    folder = kstore.failures_path(store, split).parent
    for p in sorted(folder.glob(f"{split}.shard-*-of-*.csv")) if folder.is_dir() else []:
        out.update(kstore.read_failures(store, p.stem))
    out.update(kstore.read_failures(store, split))
    return out


def _drop_merged_failure_files(store, split: str) -> None:
    """After a merge: remove ``failures/<split>.shard-i-of-n.csv`` whose every row is in ``<split>.csv``."""
    merged = kstore.read_failures(store, split)
    folder = kstore.failures_path(store, split).parent
    for p in sorted(folder.glob(f"{split}.shard-*-of-*.csv")) if folder.is_dir() else []:
        if kstore.read_failures(store, p.stem).items() <= merged.items():
            p.unlink()


def _next_part(store, model: str, split: str, offset: int) -> int:
    d = kstore.parts_dir(store, model, split)
    nums = [int(m.group(1)) for p in (d.glob("part-*.npz") if d.is_dir() else [])
            if (m := re.fullmatch(r"part-(\d+)", p.stem))]
    mine = [n for n in nums if offset <= n < offset + PART_RANGE]
    return max(mine) + 1 if mine else offset


def _npz_ids(path: Path) -> list[str]:
    """The ids of a descriptor file (reads only that member, not the embeddings)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return z["ids"].astype(str).tolist()
    except Exception as exc:
        raise KernelError(f"{path}: cannot read descriptor ids ({type(exc).__name__}: {exc})") from None


def stored_ids(store, model: str, split: str) -> set[str]:
    """Ids a model already has for the split: in ``<split>.npz`` and in readable shards (an unreadable
    shard is skipped, as :func:`kernel.store.read_parts` does: its ids are computed again)."""
    done = set()
    pdir = kstore.parts_dir(store, model, split)
    for p in sorted(pdir.glob("part-*.npz")) if pdir.is_dir() else []:
        try:
            done.update(_npz_ids(p))
        except KernelError as exc:
            log.warning("%s (its descriptors will be computed again)", exc)
    if kstore.has_split(store, model, split):
        done.update(_npz_ids(kstore.split_path(store, model, split)))
    return done


def _consolidate(store, model: str, split: str, dtype) -> None:
    """Merge shards and a previous ``<split>.npz`` (ids of other calls are kept) into ``<split>.npz``,
    sorted by id."""
    for tmp in kstore.parts_dir(store, model, split).glob(".part-*.tmp"):  # a write killed half-way
        tmp.unlink()
    if kstore.has_split(store, model, split):
        ids, emb = kstore.load_split(store, model, split, dtype=dtype)
        kstore.write_part(store, model, split, _next_part(store, model, split, PART_RANGE * 999), ids, emb)
    path = kstore.consolidate(store, model, split, order=sorted(stored_ids(store, model, split)))
    log.info("%s: wrote %s", model, path)


# ----------------------------------------------------------------------------------------------- the loop

class _Writer:
    """Buffers one model's new descriptors and writes them as atomic shards."""

    def __init__(self, store, model: str, split: str, dtype, offset: int):
        self.store, self.model, self.split, self.dtype = store, model, split, dtype
        self.next = _next_part(store, model, split, offset)
        self.ids: list[str] = []
        self.embs: list[np.ndarray] = []
        self.count = 0

    def add(self, ids, emb: torch.Tensor) -> None:
        self.ids.extend(ids)
        self.embs.append(emb.numpy().astype(self.dtype))
        self.count += len(ids)

    def pending(self) -> int:
        return len(self.ids)

    def flush(self) -> None:
        if not self.ids:
            return
        kstore.write_part(self.store, self.model, self.split, self.next, self.ids, np.concatenate(self.embs))
        log.debug("%s: shard %d (%d descriptors)", self.model, self.next, len(self.ids))
        self.next += 1
        self.ids, self.embs = [], []


@dataclass
class _Run:
    """The state one :func:`extract` call shares between its groups."""

    store: Path
    split: str
    records: list  # [(id, path)] of this call (this shard)
    id_set: set  # their ids
    todo: dict  # model -> bool array over records: descriptor still to compute
    failures: dict  # id -> reason (known ones of these records + new ones)
    known: set  # ids that had failed before this call
    summary: ExtractSummary
    device: torch.device
    precision: str
    dtype: np.dtype
    per_model: dict  # model -> first batch size
    workers: int | None
    flush_images: int
    flush_seconds: float
    shard: tuple | None
    deadline: float | None
    max_batches: int | None
    on_batch: object
    progress: bool
    t_start: float
    should_stop: object = None  # callable: True stops the run like the deadline (a multi-device parent asks)
    total: int = 0  # images to handle over all groups
    done: int = 0  # images handled so far
    batches: int = 0
    written: dict = field(default_factory=dict)  # the failure file's content on disk

    def write_failures(self) -> None:
        """Rewrite the failure file when it changed; rows of images outside this call are kept."""
        rows = {**{k: v for k, v in self.written.items() if k not in self.id_set}, **self.failures}
        if rows != self.written:
            kstore.write_failures(self.store, _failures_name(self.split, self.shard), rows)
            self.written = rows

    def stop_reason(self) -> str:
        """"deadline" once it passed, "stopped" when ``should_stop()`` says so, else ""."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "deadline"
        return "stopped" if self.should_stop is not None and self.should_stop() else ""


def _run_group(run: _Run, group: list[dict], weights_dir, label: str) -> None:
    """Decode the images any model of ``group`` still needs, once, and feed every model of the group."""
    from kernel.data.loader import make_loader, to_model_input
    from kernel.models import IMAGENET_MEAN, IMAGENET_STD, load_model

    dev, summary = run.device, run.summary
    positions = np.flatnonzero(np.logical_or.reduce([run.todo[e["name"]] for e in group]))
    sizes = sorted({e["image_size"] for e in group})
    by_size = {s: [e["name"] for e in group if e["image_size"] == s] for s in sizes}
    log.info("%s %s: %s on %s (%s), %d images at sizes %s", run.split, label,
             ", ".join(e["name"] for e in group), dev, run.precision, len(positions), sizes)
    runners = {}
    for e in group:
        model = load_model(e, weights_dir, dev)
        if dev.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        runners[e["name"]] = ModelRunner(model, e["name"], dev, run.per_model[e["name"]], run.precision)
    offset = 0 if run.shard is None else run.shard[0] * PART_RANGE
    writers = {name: _Writer(run.store, name, run.split, run.dtype, offset) for name in runners}
    sub = [run.records[i] for i in positions]
    loader = make_loader(sub, sizes, max(run.per_model[n] for n in runners), workers=run.workers,
                         pin_memory=dev.type == "cuda")
    bar = None
    if run.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(positions), unit="img", desc=f"{run.split} {label}", dynamic_ncols=True,
                   smoothing=0.05)
    last_flush = time.monotonic()
    it = None
    try:
        it = iter(loader)
        while True:
            t_wait = time.perf_counter()
            batch = next(it, None)
            summary.decode_wait += time.perf_counter() - t_wait
            if batch is None:
                break
            for pos, reason in batch["failed"]:
                rid, path = sub[pos]
                run.failures[rid] = reason
                summary.new_failures += rid not in run.known
                for t in run.todo.values():  # no model can describe it: later groups skip it
                    t[positions[pos]] = False
                log.warning("%s: %s (%s)", rid, reason, path)
            idx = positions[batch["index"].numpy()]  # positions in run.records
            ids = [run.records[i][0] for i in idx]
            for rid in ids:
                run.failures.pop(rid, None)  # a retried failure that decodes now
            for s in sizes if len(idx) else []:  # a batch may hold only broken images
                x = to_model_input(batch["images"][s], IMAGENET_MEAN, IMAGENET_STD, dev,
                                   channels_last=dev.type == "cuda")
                for name in by_size[s]:
                    mask = run.todo[name][idx]
                    if not mask.any():
                        continue
                    emb = runners[name](x if mask.all() else x[torch.from_numpy(mask).to(dev)])
                    writers[name].add([rid for rid, m in zip(ids, mask) if m], emb)
                    run.todo[name][idx[mask]] = False
                del x
            n = len(idx) + len(batch["failed"])
            run.done += n
            run.batches += 1
            for name, r in runners.items():
                summary.model_seconds[name] = r.seconds
            if bar is not None:
                bar.update(n)
                bar.set_postfix(failures=len(run.failures), refresh=False)
            if run.on_batch is not None:
                run.on_batch(Progress(run.done, run.total, time.monotonic() - run.t_start,
                                      dict(summary.model_seconds)))
            if (max(w.pending() for w in writers.values()) >= run.flush_images
                    or time.monotonic() - last_flush >= run.flush_seconds):
                for w in writers.values():
                    w.flush()
                run.write_failures()
                last_flush = time.monotonic()
            if run.max_batches is not None and run.batches >= run.max_batches:
                summary.stopped = "max_batches"
                break
            if reason := run.stop_reason():
                summary.stopped = reason
                break
    finally:
        # whatever ended the loop (the end, a deadline, Ctrl-C, an error): keep every finished descriptor
        for w in writers.values():
            w.flush()
        run.write_failures()
        if bar is not None:
            bar.close()
        for name, r in runners.items():
            summary.computed[name] += writers[name].count
            summary.model_seconds[name] = r.seconds
            summary.fp32_recomputed[name] = r.recomputed
        del runners, loader, it
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def _prepare_model(store: Path, entry: dict, weights_dir, split: str, dtype: str, overwrite: bool) -> set[str]:
    """Check the store's meta.json against the checkpoint (write it when new), drop old descriptors with
    ``overwrite``; returns the ids the model already has for the split."""
    name = entry["name"]
    if overwrite:
        kstore.split_path(store, name, split).unlink(missing_ok=True)
        pdir = kstore.parts_dir(store, name, split)
        for p in pdir.glob("part-*.npz") if pdir.is_dir() else []:
            p.unlink()
    sha = _checkpoint_sha(entry, weights_dir)
    meta_path = store / name / kstore.META
    meta = kstore.read_meta(store, name) if meta_path.is_file() else {}
    if meta and not overwrite:
        for key, have in (("sha256", sha), ("image_size", entry["image_size"])):
            if meta.get(key) and have and meta[key] != have:
                raise KernelError(
                    f"{meta_path}: descriptors were computed with {key} {str(meta[key])[:16]}, but model "
                    f"'{name}' now has {str(have)[:16]}: use another store folder, or discard them with "
                    f"'python -m kernel extract ... --overwrite'")
    new = {**meta, **_meta_for(entry, sha or meta.get("sha256"), dtype)}
    if new != meta:
        kstore.write_meta(store, name, new)
    return stored_ids(store, name, split)


def extract(
    entries: list[dict],
    weights_dir,
    records,
    split: str,
    store,
    device=None,
    batch_size=None,
    progress: bool = True,
    deadline: float | None = None,
    on_batch=None,
    *,
    workers: int | None = None,
    group_size: int | None = None,
    precision: str | None = None,
    dtype: str = "float16",
    flush_images: int = 1024,
    flush_seconds: float = 60.0,
    shard: tuple[int, int] | None = None,
    retry_failures: bool = False,
    overwrite: bool = False,
    max_batches: int | None = None,
    should_stop=None,
    worker_init=None,
) -> ExtractSummary:
    """Compute the descriptors of ``records`` (``[(id, path), ...]``, see :mod:`kernel.data.sources`) with
    every model of ``entries`` into ``STORE/<model>/<split>.npz``; resumes whatever an earlier call left.

    ``device``: None or "cuda" (every visible GPU, one worker process each, see :mod:`kernel.multidevice`;
    the CPU when there is none), "cuda:1" or "cpu" (that device only). ``batch_size``: images per decoded
    batch and each model's first batch size (an int, or ``{model: int}``; default 32 on CUDA, 8 on CPU).
    ``deadline``: a ``time.monotonic()`` value; once passed the call stops after the current batch, keeping
    everything computed (resumable). ``on_batch(Progress)`` is called after every batch. ``workers``: decode
    processes (default: one per CPU core on CUDA; half the cores on a CPU-only run, whose forward needs the
    cores itself; 0 = decode in this process). ``group_size``: models held at once
    (default: all that fit). ``precision``: "fp16" (CUDA default), "bf16" or "fp32" (CPU default).
    ``dtype``: "float16" or "float32" for the stored descriptors. ``shard``: ``(i, n)``, process every n-th
    image only and leave consolidation to a final unsharded run. ``retry_failures``: decode images that
    failed in an earlier run again. ``overwrite``: discard what the store holds for these models and this
    split. ``max_batches``: stop after that many batches (tests, dry runs). ``should_stop``: a callable
    polled after every batch; True stops the call like the deadline (``stopped`` "stopped").
    ``worker_init``: a picklable function each worker process of a multi-device call runs first.
    """
    t_start = time.monotonic()
    if not entries:
        raise KernelError("no models to extract")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", split) or ".shard-" in split:
        raise KernelError(f"split name {split!r}: use letters, digits, '_', '.', '-'")
    if dtype not in ("float16", "float32"):
        raise KernelError(f"dtype must be float16 or float32 (got {dtype!r})")
    records = [(str(r[0]), str(r[1])) for r in records]
    if shard is not None:
        from kernel.data.sources import shard as take_shard

        records = take_shard(records, *shard)
    from kernel.multidevice import extract_devices, worth_sharing

    devices = extract_devices(device)
    dev = devices[0] if shard is None else resolve_device(device)  # a shard is one process on one device
    names = [e["name"] for e in entries]
    default = DEFAULT_BATCH["cuda" if dev.type == "cuda" else "cpu"]
    sizes = batch_size if isinstance(batch_size, dict) else {}
    per_model = {n: int(sizes.get(n, default) if sizes else (batch_size or default)) for n in names}
    if min(per_model.values()) < 1:
        raise KernelError("batch size must be >= 1")
    store = Path(store)
    try:
        store.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KernelError(f"{store}: cannot create the descriptor store ({exc.strerror or exc})") from None
    if not os.access(store, os.W_OK):
        raise KernelError(f"{store}: the descriptor store is not writable")
    record_ids = [r[0] for r in records]
    id_set = set(record_ids)
    if len(id_set) != len(record_ids):
        dup = next(i for i in record_ids if record_ids.count(i) > 1)
        raise KernelError(f"image id '{dup}' appears more than once in the records of split '{split}'")
    summary = ExtractSummary(split=split, images=len(records), models=names, device=str(dev))
    done = {}
    for e in entries:
        done[e["name"]] = _prepare_model(store, e, weights_dir, split, dtype, overwrite)
        summary.present[e["name"]] = len(done[e["name"]] & id_set)
        summary.computed[e["name"]] = 0
        summary.model_seconds[e["name"]] = 0.0
    # a failure row of an image every model has a descriptor of (decoded by a later retry) is stale
    known = {k: v for k, v in _read_all_failures(store, split).items()
             if k in id_set and not all(k in d for d in done.values())}
    skip = set() if retry_failures else set(known)
    todo = {n: np.array([i not in done[n] and i not in skip for i in record_ids], dtype=bool) for n in names}
    pending = np.logical_or.reduce([todo[n] for n in names])
    if shard is None and max_batches is None and not (deadline is not None and time.monotonic() >= deadline) \
            and worth_sharing(devices, int(pending.sum()), max(per_model.values())):
        return _extract_on_devices(
            devices, (entries, weights_dir, [r for r, p in zip(records, pending) if p], split, store), records,
            summary, dict(batch_size=batch_size, workers=workers, group_size=group_size, precision=precision,
                          dtype=dtype, flush_images=flush_images, flush_seconds=flush_seconds, deadline=deadline),
            retry_failures=retry_failures, on_batch=on_batch, progress=progress, should_stop=should_stop,
            worker_init=worker_init, t_start=t_start)
    if workers is None:
        from kernel.data.loader import default_workers

        workers = default_workers() if dev.type == "cuda" else max(1, default_workers() // 2)
    run = _Run(store=store, split=split, records=records, id_set=id_set, todo=todo, failures=dict(known),
               known=set(known), summary=summary, device=dev,
               precision=precision or ("fp16" if dev.type == "cuda" else "fp32"),
               dtype=np.dtype(dtype), per_model=per_model, workers=workers, flush_images=flush_images,
               flush_seconds=flush_seconds, shard=shard, deadline=deadline, max_batches=max_batches,
               on_batch=on_batch, progress=progress, t_start=t_start, should_stop=should_stop,
               written=kstore.read_failures(store, _failures_name(split, shard)))
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes per model: let cudnn pick its kernels

    _run_groups(run, entries, weights_dir, group_size, progress)
    return _finish(run, entries, shard)


def _run_groups(run: _Run, entries: list[dict], weights_dir, group_size, progress: bool) -> None:
    summary, todo = run.summary, run.todo
    groups = plan_groups([e for e in entries if todo[e["name"]].any()], weights_dir, run.device, group_size)
    run.total = sum(int(np.logical_or.reduce([todo[e["name"]] for e in g]).sum()) for g in groups)
    for gi, group in enumerate(groups):
        if summary.stopped:
            break
        if reason := run.stop_reason():
            summary.stopped = reason
            break
        if not np.logical_or.reduce([todo[e["name"]] for e in group]).any():
            continue  # everything left failed to decode in an earlier group
        if progress:
            from tqdm.contrib.logging import logging_redirect_tqdm

            with logging_redirect_tqdm():
                _run_group(run, group, weights_dir, f"{gi + 1}/{len(groups)}")
        else:
            _run_group(run, group, weights_dir, f"{gi + 1}/{len(groups)}")


def _finish(run: _Run, entries: list[dict], shard) -> ExtractSummary:
    """Write the failures, tell whether the split is complete, and consolidate it when it is (no shard)."""
    summary, todo, store, split = run.summary, run.todo, run.store, run.split
    record_ids, names, dtype = [r[0] for r in run.records], summary.models, run.dtype
    run.write_failures()
    summary.failures = dict(run.failures)
    summary.complete = True
    for name in names:
        if any(t and i not in run.failures for i, t in zip(record_ids, todo[name])):
            summary.complete = False
            continue
        if shard is not None:
            continue
        if kstore.parts_dir(store, name, split).is_dir():
            _consolidate(store, name, split, np.dtype(dtype))
        elif not kstore.has_split(store, name, split):  # every image failed: an empty, valid split
            dim = next(e for e in entries if e["name"] == name).get("embedding_dim", 512)
            kstore.save_split(store, name, split, [], np.zeros((0, dim), dtype=dtype))
    if shard is None and summary.complete:
        _drop_merged_failure_files(store, split)
    if shard is not None and summary.complete:
        log.info("shard %d/%d of %s done: copy every shard's <model>/%s.parts folders and failures/ files into "
                 "one store, then run extract once more without --shard to merge", shard[0], shard[1], split,
                 split)
    summary.seconds = time.monotonic() - run.t_start
    return summary


def _extract_on_devices(devices, args: tuple, records, summary: ExtractSummary, opts: dict, *, retry_failures,
                        on_batch, progress, should_stop, worker_init, t_start) -> ExtractSummary:
    """One worker process per device on a share of ``args[2]`` (the records still to do), then the unsharded
    pass on one device that merges their shards (see :mod:`kernel.multidevice`)."""
    from kernel import multidevice as md

    n = len(devices)
    wopts = {**opts, "retry_failures": retry_failures,
             "workers": md.worker_decoders(opts["workers"], n, devices[0].type)}
    results = md.run_workers(devices, args, wopts, total=len(args[2]), on_batch=on_batch, progress=progress,
                             split=summary.split, t_start=t_start, worker_init=worker_init)
    errors = md.merge_summaries(summary, results, devices)
    summary.device = ",".join(str(d) for d in devices)
    good = [devices[i] for i in sorted(results) if not isinstance(results[i], str)]
    if not good:
        raise KernelError(f"extraction failed on every device: {'; '.join(errors)}")
    for e in errors:
        log.error("%s; its share is left to the final pass on %s", e, good[0])
    if not summary.stopped:  # merge (and compute what a failed worker left) on one device
        last = extract(args[0], args[1], records, summary.split, args[4], device=str(good[0]), progress=progress,
                       on_batch=on_batch, should_stop=should_stop, **opts)
        for m, c in last.computed.items():
            summary.computed[m] += c
            summary.model_seconds[m] += last.model_seconds.get(m, 0.0)
        summary.new_failures += last.new_failures
        summary.stopped, summary.complete, summary.failures = last.stopped, last.complete, last.failures
    else:
        summary.failures = {k: v for k, v in _read_all_failures(args[4], summary.split).items()
                            if k in {r[0] for r in records}}
    summary.seconds = time.monotonic() - t_start
    return summary


# ----------------------------------------------------------------------------------------------- the command

def add_arguments(p: argparse.ArgumentParser) -> None:
    from kernel.cli import number

    p.add_argument("--manifest", required=True, help="weights_manifest.json")
    p.add_argument("--weights", required=True, help="folder holding the checkpoints named in the manifest")
    p.add_argument("--images", required=True,
                   help="a Kaggle competition folder (uses its SPLIT folder), a folder of images, or a CSV id,path")
    p.add_argument("--split", required=True, help="split name (train, index, test, ...)")
    p.add_argument("--store", required=True, help="descriptor store folder")
    p.add_argument("--models", default=None, help="comma-separated subset of the manifest's models")
    p.add_argument("--track", choices=["recognition", "retrieval"], default=None,
                   help="only the models of this track")
    p.add_argument("--device", default=None, help="cuda (every visible GPU, one worker process each), cuda:N (that "
                   "GPU only) or cpu (default: every visible GPU, else the CPU)")
    p.add_argument("--batch-size", type=number(int, 1), default=None, help="images per batch (default 32 on CUDA, 8 on CPU; "
                   "halved per model on out-of-memory)")
    p.add_argument("--workers", type=number(int, 0), default=None,
                   help="decode processes (default: one per CPU core with CUDA, half of them on CPU)")
    p.add_argument("--group-size", type=number(int, 1), default=None,
                   help="models held at once (default: all that fit in half the device memory; 1 = model by model)")
    p.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default=None,
                   help="autocast precision (default fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="stored descriptor dtype")
    p.add_argument("--shard", default=None, help="i/n: this machine's share of the images (offline train/index); "
                   "default: torchrun's RANK/WORLD_SIZE when set")
    p.add_argument("--time-limit", type=number(float, 0, exclusive_min=True), default=None,
                   help="stop cleanly after this many seconds (resumable)")
    p.add_argument("--flush-images", type=number(int, 1), default=1024, help="write a shard every N images per model")
    p.add_argument("--flush-seconds", type=number(float, 0, exclusive_min=True), default=60.0, help="... or every S seconds")
    p.add_argument("--retry-failures", action="store_true", help="decode images that failed before again")
    p.add_argument("--overwrite", action="store_true", help="discard the store's descriptors of these models")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from kernel.data.sources import open_source, parse_shard
    from kernel.models import load_manifest, select

    entries = select(load_manifest(args.manifest), args.models, args.track)
    if not entries:
        raise KernelError(f"{args.manifest}: no model left after --models/--track")
    if not Path(args.weights).is_dir():
        raise KernelError(f"{args.weights}: weights folder not found")
    shard, device = None, args.device
    if args.shard:
        shard = parse_shard(args.shard)
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun: one shard per process
        shard = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
        if device is None and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    records = open_source(args.images, args.split)
    if not records:
        raise KernelError(f"{args.images}: no images found for split '{args.split}'")
    log.info("%s: %d images from %s%s", args.split, len(records), args.images,
             f" (shard {shard[0]}/{shard[1]})" if shard else "")
    for name, value in (("--batch-size", args.batch_size), ("--flush-images", args.flush_images)):
        if value is not None and value < 1:
            raise KernelError(f"{name} must be >= 1")
    if args.workers is not None and args.workers < 0:
        raise KernelError("--workers must be >= 0")
    deadline = time.monotonic() + args.time_limit if args.time_limit else None
    summary = extract(
        entries, args.weights, records, args.split, args.store, device=device, batch_size=args.batch_size,
        progress=not args.no_progress, deadline=deadline, workers=args.workers, group_size=args.group_size,
        precision=args.precision, dtype=args.dtype, flush_images=args.flush_images,
        flush_seconds=args.flush_seconds, shard=shard, retry_failures=args.retry_failures,
        overwrite=args.overwrite,
    )
    print(summary.line())
    return 0 if summary.complete or summary.stopped else 1
