"""The 12-hour budget: FLOP counts, a documented P100 time model, and the plan of which models fit.

P100 model (SPEC §5): 18.7 TFLOPS fp16, 9.3 TFLOPS fp32, 732 GB/s, no tensor cores. A model's projected
time per image is ``GFLOP / (peak TFLOPS x efficiency)`` milliseconds, where GFLOP is torch's flop counter on
the whole descriptor model (2 FLOPs per multiply-add) and ``efficiency`` is the fraction of peak that network
family reaches. The defaults below are our stated assumptions, not measurements: EfficientNets are dominated
by depthwise convolutions and SE blocks that are memory-bound (about a fifth of peak), the Swin part of the
hybrids is matmul-heavy (about a third). With these, the eight-model recognition ensemble projects to a few
images per second, as SPEC §6 expects. Calibration: a profile run on a real GPU reports the efficiency it
measured (FLOPs / (measured time x that GPU's non-tensor-core fp16 peak)); pass those numbers with
``--efficiency family=value`` to replace the assumptions, and record them in BENCHMARKS.md.

The planner keeps models in ``priority`` order (1 = most valuable) and drops from the highest number down
until the projected run fits the deadline minus a reserve for loading and post-processing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

P100 = {"name": "NVIDIA Tesla P100 16GB (Kaggle)", "fp16_tflops": 18.7, "fp32_tflops": 9.3, "mem_gbs": 732.0}
# fraction of the P100's fp16 peak each family reaches at inference (assumed; see module docstring)
DEFAULT_EFFICIENCY = {"dolg": 0.20, "effnet": 0.20, "hybrid": 0.33}
# non-tensor-core fp16 peaks of GPUs a profile may run on, to report the efficiency it measured
GPU_FP16_TFLOPS = {"P100": 18.7, "T4": 65.0, "V100": 31.4, "A100": 78.0, "H100": 134.0, "H200": 134.0, "L4": 30.3}
TARGETS = {"p100": P100}


def count_gflops(entry: dict) -> float:
    """GFLOP per image of an entry's descriptor model at its image size (torch's flop counter, meta device:
    nothing is allocated or computed)."""
    from torch.utils.flop_counter import FlopCounterMode

    from kernel.models import build_model

    with torch.device("meta"):
        model = build_model(entry).eval()
        x = torch.empty(1, 3, entry["image_size"], entry["image_size"])
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 1e9


def projected_ms(gflop: float, family: str, target: dict = P100, efficiency: dict | None = None) -> float:
    """Projected milliseconds per image on ``target`` in fp16 at the family's efficiency."""
    eff = {**DEFAULT_EFFICIENCY, **(efficiency or {})}[family]
    return gflop / (target["fp16_tflops"] * eff)


def measured_efficiency(gflop: float, ms: float, device_name: str) -> float | None:
    """Fraction of a known GPU's fp16 peak a measurement reached (None for CPUs / unknown GPUs)."""
    for key, tflops in GPU_FP16_TFLOPS.items():
        if key in device_name.upper():
            return gflop / (ms * tflops)
    return None


@dataclass
class Plan:
    kept: list[str]
    dropped: list[str]
    projected_s: float
    budget_s: float
    decisions: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.projected_s <= self.budget_s

    def as_dict(self) -> dict:
        return {"kept": self.kept, "dropped": self.dropped, "projected_hours": self.projected_s / 3600,
                "budget_hours": self.budget_s / 3600, "fits": self.fits, "decisions": self.decisions}


def plan_models(
    costs: dict[str, float],
    priority: dict[str, int],
    budget_s: float,
    fixed_s: float = 0.0,
    min_models: int = 1,
) -> Plan:
    """Choose the models that fit.

    ``costs``: projected seconds each model needs for all of its remaining work; ``fixed_s``: time that does
    not depend on the models kept (decoding, post-processing, writing). Models are dropped from the highest
    ``priority`` number down until ``fixed_s + sum(costs) <= budget_s``, but at least ``min_models`` (the most
    valuable ones) are always kept: a valid submission from one model beats none.
    """
    order = sorted(costs, key=lambda n: (priority[n], n))
    kept = list(order)
    decisions = []
    total = fixed_s + sum(costs[n] for n in kept)
    while total > budget_s and len(kept) > min_models:
        victim = kept.pop()
        decisions.append(
            f"drop {victim} (priority {priority[victim]}): projected {fmt_duration(total)} > budget "
            f"{fmt_duration(budget_s)}; it needs {fmt_duration(costs[victim])}"
        )
        total -= costs[victim]
    if total > budget_s:
        decisions.append(f"even {', '.join(kept)} projects to {fmt_duration(total)} > {fmt_duration(budget_s)}: "
                         "kept anyway, the run stops at the deadline with whatever is done")
    dropped = [n for n in order if n not in kept]
    return Plan(kept, dropped, total, budget_s, decisions)


def fmt_duration(seconds: float) -> str:
    """Seconds for short spans, minutes for medium ones, hours for long ones."""
    if not math.isfinite(seconds):
        return "inf"
    if abs(seconds) < 120:
        return f"{seconds:.1f} s"
    if abs(seconds) < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"
