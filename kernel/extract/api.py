""":func:`extract`, the call the command, ``predict`` and the multi-device workers make: it checks its
arguments, reads what the store already holds, then runs the loop on one device (:mod:`kernel.extract.loop`)
or hands over to one worker process per device (:mod:`kernel.multidevice`)."""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import numpy as np
import torch

from kernel import store as kstore
from kernel.devices import resolve_device
from kernel.errors import KernelError
from kernel.extract.loop import _Run, _run_groups
from kernel.extract.planning import batch_sizes
from kernel.extract.resume import descriptor_dim, known_failures, prepare_model
from kernel.extract.summary import ExtractSummary

log = logging.getLogger(__name__)


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
    _check_arguments(entries, split, dtype)
    records = _own_records(records, shard)
    from kernel.multidevice import extract_devices, worth_sharing

    devices = extract_devices(device)
    dev = devices[0] if shard is None else resolve_device(device)  # a shard is one process on one device
    names = [e["name"] for e in entries]
    per_model = batch_sizes(names, batch_size, dev)
    store = kstore.make_writable(store)
    id_set = _unique_ids(records, split)
    summary = ExtractSummary(split=split, images=len(records), models=names, device=str(dev))
    done = _prepare_models(store, entries, weights_dir, split, dtype, overwrite, summary, id_set)
    known = known_failures(store, split, id_set, done)
    skip = set() if retry_failures else set(known)
    todo = {n: np.array([r[0] not in done[n] and r[0] not in skip for r in records], dtype=bool) for n in names}
    pending = np.logical_or.reduce([todo[n] for n in names])
    if shard is None and max_batches is None and not (deadline is not None and time.monotonic() >= deadline) \
            and worth_sharing(devices, int(pending.sum()), max(per_model.values())):
        return _extract_on_devices(
            devices, (entries, weights_dir, [r for r, p in zip(records, pending) if p], split, store), records,
            summary, dict(batch_size=batch_size, workers=workers, group_size=group_size, precision=precision,
                          dtype=dtype, flush_images=flush_images, flush_seconds=flush_seconds, deadline=deadline),
            retry_failures=retry_failures, on_batch=on_batch, progress=progress, should_stop=should_stop,
            worker_init=worker_init, t_start=t_start)
    run = _Run(store=store, split=split, records=records, id_set=id_set, todo=todo, failures=dict(known),
               known=set(known), summary=summary, device=dev,
               precision=precision or ("fp16" if dev.type == "cuda" else "fp32"),
               dtype=np.dtype(dtype), per_model=per_model, workers=_decode_workers(workers, dev),
               flush_images=flush_images, flush_seconds=flush_seconds, shard=shard, deadline=deadline,
               max_batches=max_batches, on_batch=on_batch, progress=progress, t_start=t_start,
               should_stop=should_stop, written=kstore.read_failures(store, kstore.failures_name(split, shard)))
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes per model: let cudnn pick its kernels
    _run_groups(run, entries, weights_dir, group_size, progress)
    return _finish(run, entries, shard)


def _check_arguments(entries: list[dict], split: str, dtype: str) -> None:
    """Refuse a call without models, a split name that is not a plain file name, or an unknown dtype."""
    if not entries:
        raise KernelError("no models to extract")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", split) or ".shard-" in split:
        raise KernelError(f"split name {split!r}: use letters, digits, '_', '.', '-'")
    if dtype not in ("float16", "float32"):
        raise KernelError(f"dtype must be float16 or float32 (got {dtype!r})")


def _own_records(records, shard: tuple[int, int] | None) -> list[tuple[str, str]]:
    """The records as ``(id, path)`` strings; with ``shard`` ``(i, n)`` only this shard's interleaved share."""
    records = [(str(r[0]), str(r[1])) for r in records]
    if shard is None:
        return records
    from kernel.data.sources import shard as take_shard

    return take_shard(records, *shard)


def _unique_ids(records: list[tuple[str, str]], split: str) -> set[str]:
    """The records' ids; :class:`KernelError` naming the first that appears twice."""
    record_ids = [r[0] for r in records]
    id_set = set(record_ids)
    if len(id_set) != len(record_ids):
        dup = next(i for i in record_ids if record_ids.count(i) > 1)
        raise KernelError(f"image id '{dup}' appears more than once in the records of split '{split}'")
    return id_set


def _prepare_models(store: Path, entries: list[dict], weights_dir, split: str, dtype: str, overwrite: bool,
                    summary: ExtractSummary, id_set: set[str]) -> dict[str, set[str]]:
    """Check (or write) each model's meta.json and read the ids it already has (counted in the summary as
    present); returns model -> those ids."""
    done = {}
    for e in entries:
        done[e["name"]] = prepare_model(store, e, weights_dir, split, dtype, overwrite)
        summary.present[e["name"]] = len(done[e["name"]] & id_set)
        summary.computed[e["name"]] = 0
        summary.model_seconds[e["name"]] = 0.0
    return done


def _decode_workers(workers: int | None, dev: torch.device) -> int:
    """Decode processes: ``workers`` when given, else :func:`kernel.data.loader.decode_workers`."""
    from kernel.data.loader import decode_workers

    return workers if workers is not None else decode_workers(dev.type)


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
            log.info("%s: wrote %s", name, kstore.merge_parts(store, name, split, np.dtype(dtype)))
        elif not kstore.has_split(store, name, split):  # every image failed: an empty, valid split
            dim = descriptor_dim(next(e for e in entries if e["name"] == name))
            kstore.save_split(store, name, split, [], np.zeros((0, dim), dtype=dtype))
    if shard is None and summary.complete:
        kstore.drop_merged_failure_files(store, split)
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
        md.merge_summaries(summary, {0: last}, [good[0]])
        summary.stopped, summary.complete, summary.failures = last.stopped, last.complete, last.failures
    else:
        ids = {r[0] for r in records}
        summary.failures = {k: v for k, v in kstore.read_all_failures(args[4], summary.split).items() if k in ids}
    summary.seconds = time.monotonic() - t_start
    return summary
