"""The loop of one call (:func:`kernel.extract.extract`): group by group, every image a model of the
group still needs is decoded once and fed to each of them; their descriptors are written as shards
(:class:`_Writer`), failures and progress recorded in the call's state (:class:`_Run`)."""
from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kernel import store as kstore
from kernel.data.loader import to_model_input
from kernel.models import IMAGENET_MEAN, IMAGENET_STD
from kernel.extract.planning import plan_groups
from kernel.extract.runner import ModelRunner
from kernel.extract.summary import ExtractSummary, Progress

log = logging.getLogger(__name__)


class _Writer:
    """Buffers one model's new descriptors and writes them as atomic shards."""

    def __init__(self, store, model: str, split: str, dtype, offset: int):
        self.store, self.model, self.split, self.dtype = store, model, split, dtype
        self.next = kstore.next_part(store, model, split, offset)
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
            kstore.write_failures(self.store, kstore.failures_name(self.split, self.shard), rows)
            self.written = rows

    def stop_reason(self) -> str:
        """"deadline" once it passed, "stopped" when ``should_stop()`` says so, else ""."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "deadline"
        return "stopped" if self.should_stop is not None and self.should_stop() else ""


@dataclass
class _Group:
    """One group of models in a run: the images it needs and what feeds and stores each model."""

    positions: np.ndarray  # positions in ``run.records`` of the images any model of the group still needs
    by_size: dict  # input size -> names of the group's models of that size
    runners: dict  # model name -> ModelRunner
    writers: dict  # model name -> _Writer

    @property
    def sizes(self) -> list[int]:
        return sorted(self.by_size)


def _open_group(run: _Run, group: list[dict], weights_dir, label: str) -> _Group:
    """Load the group's models on the run's device and open a shard writer for each."""
    from kernel.models import load_model

    dev = run.device
    positions = np.flatnonzero(np.logical_or.reduce([run.todo[e["name"]] for e in group]))
    sizes = sorted({e["image_size"] for e in group})
    log.info("%s %s: %s on %s (%s), %d images at sizes %s", run.split, label,
             ", ".join(e["name"] for e in group), dev, run.precision, len(positions), sizes)
    runners = {}
    for e in group:
        t_load = time.perf_counter()
        model = load_model(e, weights_dir, dev)
        if dev.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
            torch.cuda.synchronize(dev)
        loads = run.summary.load_seconds
        loads[e["name"]] = loads.get(e["name"], 0.0) + time.perf_counter() - t_load  # a one-time cost of the call
        runners[e["name"]] = ModelRunner(model, e["name"], dev, run.per_model[e["name"]], run.precision)
    offset = kstore.part_offset(run.shard)
    writers = {name: _Writer(run.store, name, run.split, run.dtype, offset) for name in runners}
    by_size = {s: [e["name"] for e in group if e["image_size"] == s] for s in sizes}
    return _Group(positions, by_size, runners, writers)


def _record_failures(run: _Run, g: _Group, batch: dict) -> None:
    """Record the batch's undecodable images: no model, of this group or a later one, tries them again."""
    for pos, reason in batch["failed"]:
        rid, path = run.records[g.positions[pos]]
        run.failures[rid] = reason
        run.summary.new_failures += rid not in run.known
        for t in run.todo.values():
            t[g.positions[pos]] = False
        log.warning("%s: %s (%s)", rid, reason, path)


def _feed_models(run: _Run, g: _Group, batch: dict) -> int:
    """Feed the batch's decoded images to each model of the group that still needs them, normalised once
    per input size; returns how many images were decoded."""
    dev = run.device
    idx = g.positions[batch["index"].numpy()]  # positions in run.records
    ids = [run.records[i][0] for i in idx]
    for rid in ids:
        run.failures.pop(rid, None)  # a retried failure that decodes now
    for s in g.sizes if len(idx) else []:  # a batch may hold only broken images
        x = to_model_input(batch["images"][s], IMAGENET_MEAN, IMAGENET_STD, dev, channels_last=dev.type == "cuda")
        for name in g.by_size[s]:
            mask = run.todo[name][idx]
            if not mask.any():
                continue
            emb = g.runners[name](x if mask.all() else x[torch.from_numpy(mask).to(dev)])
            g.writers[name].add([rid for rid, m in zip(ids, mask) if m], emb)
            run.todo[name][idx[mask]] = False
        del x
    return len(idx)


def _count_batch(run: _Run, g: _Group, n: int, bar) -> None:
    """Count a batch of ``n`` handled images: the models' seconds, the progress bar, ``on_batch``."""
    run.done += n
    run.batches += 1
    for name, r in g.runners.items():
        run.summary.model_seconds[name] = r.seconds
    if bar is not None:
        bar.update(n)
        bar.set_postfix(failures=len(run.failures), refresh=False)
    if run.on_batch is not None:
        run.on_batch(Progress(run.done, run.total, time.monotonic() - run.t_start, dict(run.summary.model_seconds)))


def _flush(run: _Run, g: _Group) -> None:
    """Write every pending descriptor of the group as shards, and the failure file when it changed."""
    for w in g.writers.values():
        w.flush()
    run.write_failures()


def _stops_here(run: _Run) -> bool:
    """Whether the call stops after this batch (``max_batches`` reached, deadline, ``should_stop``); the
    reason goes to the summary."""
    if run.max_batches is not None and run.batches >= run.max_batches:
        run.summary.stopped = "max_batches"
    elif reason := run.stop_reason():
        run.summary.stopped = reason
    else:
        return False
    return True


def _feed_group(run: _Run, g: _Group, batches, bar) -> None:
    """Feed the group every decoded batch until they run out or the call must stop; shards are written
    every ``flush_images`` images or ``flush_seconds`` seconds."""
    last_flush = time.monotonic()
    while True:
        t_wait = time.perf_counter()
        batch = next(batches, None)
        run.summary.decode_wait += time.perf_counter() - t_wait
        if batch is None:
            return
        _record_failures(run, g, batch)
        n = _feed_models(run, g, batch) + len(batch["failed"])
        _count_batch(run, g, n, bar)
        if (max(w.pending() for w in g.writers.values()) >= run.flush_images
                or time.monotonic() - last_flush >= run.flush_seconds):
            _flush(run, g)
            last_flush = time.monotonic()
        if _stops_here(run):
            return


def _close_group(run: _Run, g: _Group, bar) -> None:
    """Keep every finished descriptor and record the models' counts in the summary; drops the models."""
    _flush(run, g)
    if bar is not None:
        bar.close()
    for name, r in g.runners.items():
        run.summary.computed[name] += g.writers[name].count
        run.summary.model_seconds[name] = r.seconds
        run.summary.warmup_seconds[name] = r.warmup_seconds
        run.summary.fp32_recomputed[name] = r.recomputed
    g.runners.clear()


def _progress_bar(run: _Run, total: int, label: str):
    """A tqdm bar over the group's images, or None without ``progress``."""
    if not run.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc=f"{run.split} {label}", dynamic_ncols=True, smoothing=0.05)


def _run_group(run: _Run, group: list[dict], weights_dir, label: str) -> None:
    """Decode the images any model of ``group`` still needs, once, and feed every model of the group."""
    from kernel.data.loader import make_loader

    g = _open_group(run, group, weights_dir, label)
    loader = make_loader([run.records[i] for i in g.positions], g.sizes, max(run.per_model[n] for n in g.runners),
                         workers=run.workers, pin_memory=run.device.type == "cuda")
    bar = _progress_bar(run, len(g.positions), label)
    batches = None
    try:
        batches = iter(loader)
        t_loop = time.monotonic()
        _feed_group(run, g, batches, bar)
        run.summary.loop_seconds += time.monotonic() - t_loop  # the rest of the call is its one-time setup
    finally:
        # whatever ended the loop (the end, a deadline, Ctrl-C, an error): keep every finished descriptor
        _close_group(run, g, bar)
        del g, loader, batches
        gc.collect()
        if run.device.type == "cuda":
            torch.cuda.empty_cache()


def _start_device(device: torch.device) -> float:
    """Seconds to start ``device`` in this process: on a GPU the CUDA context (driver and runtime set-up), a
    one-time cost of the process, close to 0 once started; 0 on the CPU."""
    if device.type != "cuda":
        return 0.0
    t0 = time.perf_counter()
    torch.empty(1, device=device)
    torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _run_groups(run: _Run, entries: list[dict], weights_dir, group_size, progress: bool) -> None:
    """Plan the groups of the models with work left (:func:`plan_groups`) and run them one after the other
    until the call must stop."""
    summary, todo = run.summary, run.todo
    if any(todo[e["name"]].any() for e in entries):  # before planning, which asks the device for its memory
        summary.startup_seconds += _start_device(run.device)
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
