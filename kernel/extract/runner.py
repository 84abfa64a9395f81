"""One model on one device (:class:`ModelRunner`): out-of-memory back-off, autocast and the NaN/inf guard."""
from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

from kernel.errors import KernelError

log = logging.getLogger(__name__)


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
        self.seconds = 0.0  # in forward passes, the first call's warm-up included
        self.items = 0
        self._first: tuple[float, int] | None = None  # (seconds, items) of the first call: see warmup_seconds
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
        dt = time.perf_counter() - t0
        if self._first is None:
            self._first = (dt, len(x))
        self.items += len(x)
        self.seconds += dt
        return torch.cat(outs) if outs else torch.zeros(0, 0)

    @property
    def warmup_seconds(self) -> float:
        """The part of :attr:`seconds` the first call took beyond the steady rate of the calls after it: a
        model's first batch pays one-time costs (cuDNN's choice of kernels for the shape, lazy initialisation, an
        idle GPU's clock ramp) that later batches do not. Measured, not assumed: the first call's seconds minus
        its items at the rate of every later call (never below 0). With a single call the steady rate is
        unknown and nothing is set apart: the whole call counts as per-image time (the safe side for a plan
        that multiplies it by the images left)."""
        if self._first is None or self.items <= self._first[1]:
            return 0.0
        first_s, first_n = self._first
        rate = (self.seconds - first_s) / (self.items - first_n)
        return max(0.0, first_s - first_n * rate)
