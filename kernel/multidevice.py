"""Extraction on every visible GPU: one worker process per device, each on its share of the images.

:func:`kernel.extract.extract` hands over to :func:`run_workers` when it has more than one device (see
:func:`extract_devices`) and enough images to share (:func:`worth_sharing`). The run is exactly the offline
``--shard i/n`` recipe done inside one call:

- the parent checks the store and the models (``meta.json``, ``--overwrite``) first, then starts one process
  per device, forked from a fork server that imports torch once and never touches CUDA (spawned where there is
  no fork server; the server keeps the environment of its start, so set ``CUDA_VISIBLE_DEVICES`` before the
  first extraction); worker ``i`` extracts the ``i``-th of ``n`` interleaved shares
  of the images that still need a descriptor, on its device, writing atomic shards in its own part-number
  range and its failures to ``failures/<split>.shard-i-of-n.csv`` (the same files ``--shard i/n`` writes);
- every worker gets the same absolute deadline (``time.monotonic()`` is one clock for every process of the
  machine) and a stop flag the parent sets on Ctrl-C or when its ``on_batch`` raises; a worker stops after its
  current batch and keeps everything it computed, as one device does;
- a worker whose parent dies (even by SIGKILL) stops like on Ctrl-C: its last batches are flushed;
- when every worker is done, the parent runs the unsharded extraction once more on one device: nothing is left
  to compute, so it merges the shards into ``<split>.npz`` exactly as after ``--shard``. A worker that failed
  (a GPU lost, out of memory at batch size 1) leaves its share to that final pass, on a device that worked;
- the failure files of the workers are removed once every row of them is in ``failures/<split>.csv`` (as after
  any merge of shards).

Each worker decodes with its share of the CPU cores. ``KERNEL_EXTRACT_DEVICES`` (for example ``cpu,cpu``)
forces the device list when ``--device`` is not given: two CPU worker processes stand in for two GPUs in the
tests.
"""
from __future__ import annotations

import logging
import os
import queue as queue_mod
import signal
import time

import torch

from kernel.devices import resolve_device
from kernel.errors import KernelError

log = logging.getLogger(__name__)

ENV_DEVICES = "KERNEL_EXTRACT_DEVICES"
MIN_BATCHES_PER_DEVICE = 4  # our reading: spawning costs seconds; predict's probe (16 images) stays in one process
JOIN_SECONDS = 120.0  # how long the parent waits for stopped workers to flush before it terminates them


def extract_devices(device=None) -> list[torch.device]:
    """The devices an extraction with ``device`` uses (``predict`` divides its projection by their number).

    ``None``/"auto": ``$KERNEL_EXTRACT_DEVICES`` when set, else every visible GPU (``CUDA_VISIBLE_DEVICES``
    narrows them), else the CPU. ``"cuda"``: every visible GPU. ``"cuda:N"`` or ``"cpu"``: that one device.
    """
    if device in (None, "", "auto"):
        forced = os.environ.get(ENV_DEVICES, "").strip()
        if forced:
            names = [d.strip() for d in forced.split(",") if d.strip()]
            if not names:
                raise KernelError(f"${ENV_DEVICES}={forced!r}: name devices, e.g. cuda:0,cuda:1 or cpu,cpu")
            try:
                return [resolve_device(d) for d in names]
            except KernelError as exc:
                raise KernelError(f"${ENV_DEVICES}={forced!r}: {exc}") from None
    dev = resolve_device(device)  # None: "cuda" (every visible GPU) when there is one, else the CPU
    if dev.type == "cuda" and dev.index is None:
        gpus = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        if not gpus:  # CUDA initialised, then CUDA_VISIBLE_DEVICES hid every GPU
            raise KernelError(f"CUDA sees no GPU (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): "
                              "pass --device cpu, or make a GPU visible")
        return gpus
    return [dev]


def worth_sharing(devices: list, pending: int, batch: int) -> bool:
    """Spawn one process per device only when each gets at least ``MIN_BATCHES_PER_DEVICE`` batches."""
    return len(devices) > 1 and pending >= MIN_BATCHES_PER_DEVICE * len(devices) * batch


def worker_decoders(workers: int | None, n: int, device_type: str) -> int:
    """Decode processes per worker: the CPU cores shared between the ``n`` workers (``0`` stays ``0``)."""
    from kernel.data.loader import decode_workers

    if workers == 0:
        return 0
    return max(1, (decode_workers(device_type) if workers is None else workers) // n)


# ----------------------------------------------------------------------------------------------- worker side

def _stop_with_parent() -> None:
    """SIGTERM stops this worker like Ctrl-C (its finished batches are flushed), and so does the parent's death:
    a watcher thread waits on the parent's sentinel (a pipe that closes when the parent dies, however it dies)."""
    import multiprocessing as mp
    import threading

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def watch(parent) -> None:
        parent.join()
        log.warning("the parent process died: stopping")
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    threading.Thread(target=watch, args=(mp.parent_process(),), name="parent-watch", daemon=True).start()


def _worker(i: int, n: int, device: str, args: tuple, kwargs: dict, messages, stop, log_level: int,
            worker_init) -> None:
    """One device's share (runs in a process forked from the fork server); reports progress and its summary to
    ``messages``."""
    _stop_with_parent()
    logging.basicConfig(level=log_level, format=f"%(asctime)s [{device}] %(levelname)s %(name)s: %(message)s")
    if worker_init is not None:
        worker_init()
    if device == "cpu":  # the workers share the cores
        from kernel.data.loader import default_workers

        torch.set_num_threads(max(1, default_workers() // n))
    from kernel.extract import extract

    def report(p) -> None:
        messages.put(("progress", i, p.done, p.total, p.model_seconds))

    try:
        s = extract(*args, device=device, shard=(i, n), on_batch=report, should_stop=stop.is_set,
                    progress=False, **kwargs)
        messages.put(("done", i, s))
    except BaseException as exc:  # reported to the parent, which decides; the traceback goes to the log
        if isinstance(exc, KeyboardInterrupt):
            log.warning("worker on %s stopped (%s); its finished batches are kept", device, exc)
        else:
            log.error("worker on %s failed", device, exc_info=not isinstance(exc, KernelError))
        messages.put(("error", i, f"{type(exc).__name__}: {exc}" if not isinstance(exc, KernelError) else str(exc)))


# ----------------------------------------------------------------------------------------------- parent side

def _context():
    """Fork-server workers where the platform has them: the server imports torch and the models once per run
    (CUDA is never initialised in it), each worker forks from it in well under a second; else spawned ones."""
    import multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["kernel.extract", "kernel.models", "kernel.data.loader"])
    return ctx


class _Workers:
    """The worker processes of one call and what they reported."""

    def __init__(self, devices, args, kwargs, worker_init):
        ctx = _context()
        self.messages, self.stop = ctx.Queue(), ctx.Event()
        self.devices = [str(d) for d in devices]
        n = len(self.devices)
        level = logging.getLogger().getEffectiveLevel()
        self.procs = [ctx.Process(target=_worker, name=f"extract-{d}-{i}", args=(
            i, n, d, args, kwargs, self.messages, self.stop, level, worker_init)) for i, d in enumerate(self.devices)]
        self.progress = [(0, 0, {})] * n  # (done, total, model seconds) of each worker
        self.results: dict = {}  # i -> ExtractSummary or error text

    def start(self) -> None:
        for p in self.procs:
            p.start()

    def _take(self, msg) -> None:
        kind, i = msg[0], msg[1]
        if kind == "progress":
            self.progress[i] = msg[2:5]
        else:
            self.results[i] = msg[2]

    def poll(self, timeout: float) -> bool:
        """Take one message (True) or time out (False); a worker that died silently gets an error result."""
        try:
            self._take(self.messages.get(timeout=timeout))
            return True
        except queue_mod.Empty:
            pass
        for i, p in enumerate(self.procs):
            if i not in self.results and p.exitcode is not None:
                try:  # its last messages may still be in the pipe
                    while True:
                        self._take(self.messages.get(timeout=0.5))
                except queue_mod.Empty:
                    pass
                if i not in self.results:
                    self.results[i] = f"worker process on {self.devices[i]} died (exit code {p.exitcode})"
        return False

    def finished(self) -> bool:
        return len(self.results) == len(self.procs)

    def shutdown(self) -> None:
        """Ask every worker to stop after its batch, wait for their flushes, then end the stragglers."""
        self.stop.set()
        t_end = time.monotonic() + JOIN_SECONDS
        started = [p for p in self.procs if p.pid is not None]  # an interrupted start() leaves some unstarted
        for p in started:
            p.join(max(0.1, t_end - time.monotonic()))
        for p in started:
            if p.is_alive():
                log.warning("%s did not stop within %.0f s: terminating it", p.name, JOIN_SECONDS)
                p.terminate()
                p.join(10)


def _drain(workers: _Workers, on_batch, bar, t_start: float, total: int) -> None:
    from kernel.extract import Progress

    last = 0
    while not workers.finished():
        if not workers.poll(timeout=1.0):
            continue
        done = sum(p[0] for p in workers.progress)
        if done == last:
            continue
        if bar is not None:
            bar.update(done - last)
        last = done
        if on_batch is not None:  # model seconds: summed over the devices
            seconds: dict = {}
            for p in workers.progress:
                for m, v in p[2].items():
                    seconds[m] = seconds.get(m, 0.0) + v
            on_batch(Progress(done, total, time.monotonic() - t_start, seconds))


def run_workers(devices, args: tuple, kwargs: dict, *, total: int, on_batch, progress: bool, split: str,
                t_start: float, worker_init=None) -> dict:
    """Start one worker per device on ``args``/``kwargs`` of :func:`kernel.extract.extract`, relay their
    progress, and return ``{i: ExtractSummary or error text}``. Ctrl-C or an exception of ``on_batch`` stops
    the workers (each flushes its finished batches) and is raised again."""
    workers = _Workers(devices, args, kwargs, worker_init)
    log.info("%s: %d images over %d worker processes (%s)", split, total, len(devices), ", ".join(workers.devices))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="img", desc=f"{split} x{len(devices)}", dynamic_ncols=True, smoothing=0.05)
    try:
        workers.start()
        _drain(workers, on_batch, bar, t_start, total)
    except BaseException:
        workers.shutdown()
        raise
    finally:
        if bar is not None:
            bar.close()
    for p in workers.procs:
        p.join()
    return workers.results


def merge_summaries(summary, results: dict, devices: list) -> list[str]:
    """Add the workers' counts to ``summary`` (the parent's, with ``present`` filled); returns the errors."""
    errors = []
    for i in sorted(results):
        s = results[i]
        if isinstance(s, str):
            errors.append(f"{devices[i]}: {s}")
            continue
        for m, c in s.computed.items():
            summary.computed[m] = summary.computed.get(m, 0) + c
            summary.model_seconds[m] = summary.model_seconds.get(m, 0.0) + s.model_seconds.get(m, 0.0)
            summary.fp32_recomputed[m] = summary.fp32_recomputed.get(m, 0) + s.fp32_recomputed.get(m, 0)
            summary.warmup_seconds[m] = summary.warmup_seconds.get(m, 0.0) + s.warmup_seconds.get(m, 0.0)
        for m, v in s.load_seconds.items():  # the workers load at the same time: the longest
            summary.load_seconds[m] = max(summary.load_seconds.get(m, 0.0), v)
        summary.startup_seconds = max(summary.startup_seconds, s.startup_seconds)
        summary.loop_seconds = max(summary.loop_seconds, s.loop_seconds)
        summary.new_failures += s.new_failures
        summary.decode_wait = max(summary.decode_wait, s.decode_wait)
        summary.stopped = summary.stopped or s.stopped
    return errors
