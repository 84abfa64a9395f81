"""What an extraction reports: :class:`Progress` after every batch, :class:`ExtractSummary` at the end."""
from __future__ import annotations

from dataclasses import dataclass, field


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
    """The result of :func:`kernel.extract.extract`."""

    split: str
    images: int  # records of the split (of this shard)
    models: list  # model names, in the order given
    computed: dict = field(default_factory=dict)  # model -> descriptors computed in this call
    present: dict = field(default_factory=dict)  # model -> descriptors already in the store before
    model_seconds: dict = field(default_factory=dict)  # model -> seconds in forward passes (summed over devices)
    # one-time costs, apart from the per-image ones (predict's plan counts them once per call, not per image):
    warmup_seconds: dict = field(default_factory=dict)  # model -> the part of model_seconds its first batch took
    #   beyond the model's steady rate (ModelRunner.warmup_seconds; summed over devices like model_seconds)
    load_seconds: dict = field(default_factory=dict)  # model -> seconds loading it onto the device (workers: longest)
    startup_seconds: float = 0.0  # starting the device before the first model (the CUDA context); 0 on the CPU and
    #   where this process had started it already (workers: the longest)
    loop_seconds: float = 0.0  # wall seconds feeding decoded batches to the models (waits for decoding included);
    #   the rest of `seconds` is the call's setup: checks, planning, loading, starting the loader, merging shards
    failures: dict = field(default_factory=dict)  # id -> reason, every known failure of these records
    new_failures: int = 0  # failures found in this call
    decode_wait: float = 0.0  # seconds the loop waited for decoded batches (decoding starved the device)
    seconds: float = 0.0
    complete: bool = False  # every model has every (decodable) record
    stopped: str = ""  # why the call ended early ("deadline", "stopped", "max_batches"), empty when it ran to the end
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
                             f"({self.images_per_s(m):.1f} img/s)" + self._recomputed(m))
            else:
                parts.append(f"{m} {self.present.get(m, 0)} already stored")
        return "; ".join(parts)

    def _recomputed(self, model: str) -> str:
        """", 3 images recomputed in fp32 (non-finite half-precision output)" when the NaN guard caught any."""
        n = self.fp32_recomputed.get(model, 0)
        return f", {n} image{'s' if n != 1 else ''} recomputed in fp32 (non-finite half-precision output)" if n else ""
