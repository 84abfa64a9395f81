"""The 12-hour budget: FLOP counts, a documented time model of each Kaggle accelerator, and the plan of which
models fit.

The cards (:data:`TARGETS`; peaks from NVIDIA's datasheets, Kaggle's names from its CLI):

- ``t4x2``, what Kaggle gives today (``machine_shape`` ``NvidiaTeslaT4``, "GPU T4 x2"): two NVIDIA T4, each
  sm_75, 16 GB GDDR6 at 320 GB/s, 8.1 TFLOPS fp32 and 65 TFLOPS fp16 on its tensor cores (NVIDIA T4 datasheet).
- ``p100``, the 2021 design target (``NvidiaTeslaP100``, retired on Kaggle: ``kaggle`` 2.2.5 runs it on a T4):
  one NVIDIA Tesla P100 PCIe, sm_60, 16 GB HBM2 at 732 GB/s, 9.3 TFLOPS fp32, 18.7 TFLOPS fp16, no tensor cores
  (NVIDIA Tesla P100 datasheet, PCIe 16 GB).

A model's projected time per image on one card is ``GFLOP / (card fp16 peak x efficiency)`` milliseconds, where
GFLOP is torch's flop counter on the whole descriptor model (2 FLOPs per multiply-add) and ``efficiency`` is the
fraction of that peak the network family reaches. A card with ``devices`` = n shares the images between its n
devices (``extract`` runs one worker process per GPU), so a run takes ``images x ms / n``.

Efficiencies are our stated assumptions, not measurements:

- P100 (:data:`DEFAULT_EFFICIENCY`): EfficientNets are dominated by depthwise convolutions and SE blocks that
  are memory-bound (about a fifth of peak), the Swin part of the hybrids is matmul-heavy (about a third). With
  these the eight-model recognition ensemble projects to a few images per second, as docs/kaggle.md#the-scale-of-the-work expects.
- Any other card (the T4): *the bandwidth rule*: the throughput a family reaches on the P100 (TFLOPS achieved),
  scaled by the card's memory bandwidth over the P100's, as a fraction of the card's own peak:
  ``eff_card = eff_p100 x (18.7 / peak_card) x (bandwidth_card / 732)``. On a T4 that is 0.025 of 65 TFLOPS for
  the EfficientNets: 2.3x slower than a P100 per card, 1.14x slower for two. It is pessimistic for the hybrids,
  whose Swin matmuls run on the T4's tensor cores; the pessimistic side is the safe one for a 12-hour limit.

Calibration: a profile run on a real GPU reports the efficiency it measured (FLOPs / (measured time x that
GPU's fp16 peak in :data:`GPU_FP16_TFLOPS`)). Pass it back with ``--efficiency family=value`` (the P100 basis,
which the derived cards follow) or ``--efficiency t4x2:family=value`` (that card only), and record it in
BENCHMARKS.md. A measurement on another GPU (an H100) does not carry over to a T4: both the peak and the
bandwidth ratio differ by several times, and depthwise convolutions do not scale with either alone.

The planner keeps models in ``priority`` order (1 = most valuable) and drops from the highest number down
until the projected run fits the deadline minus a reserve for loading and post-processing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

P100 = {"key": "p100", "name": "NVIDIA Tesla P100 16GB PCIe (Kaggle, retired: runs on the T4 x2)",
        "machine_shape": "NvidiaTeslaP100", "devices": 1, "fp16_tflops": 18.7, "fp32_tflops": 9.3,
        "mem_gbs": 732.0, "memory_gb": 16, "compute_capability": "6.0", "tensor_cores": False,
        "source": "NVIDIA Tesla P100 datasheet (PCIe 16 GB); docs/kaggle.md#the-notebooks-machine-2021-and-today"}
T4X2 = {"key": "t4x2", "name": "2x NVIDIA T4 16GB (Kaggle 'GPU T4 x2')", "machine_shape": "NvidiaTeslaT4",
        "devices": 2, "fp16_tflops": 65.0, "fp32_tflops": 8.1, "mem_gbs": 320.0, "memory_gb": 16,
        "compute_capability": "7.5", "tensor_cores": True,
        "source": "NVIDIA T4 datasheet (fp16 = mixed precision on tensor cores); kaggle CLI 2.2.5 help"}
TARGETS = {"t4x2": T4X2, "p100": P100}  # the first is the default: what Kaggle gives today
# fraction of the P100's fp16 peak each family reaches at inference (assumed; see module docstring)
DEFAULT_EFFICIENCY = {"dolg": 0.20, "effnet": 0.20, "hybrid": 0.33}
# the fp16 peak a measured efficiency is a fraction of: non-tensor-core peaks, except the T4's, whose datasheet
# figure (and the T4 efficiencies above) is its tensor-core peak
GPU_FP16_TFLOPS = {"P100": 18.7, "T4": 65.0, "V100": 31.4, "A100": 78.0, "H100": 134.0, "H200": 134.0, "L4": 30.3}


def target_efficiency(target: dict, efficiency: dict | None = None) -> dict:
    """Each family's fraction of ``target``'s fp16 peak. ``efficiency``: ``{family: value}`` overrides the
    P100 basis, ``{"t4x2:family": value}`` one card's own number."""
    over = efficiency or {}
    base = {**DEFAULT_EFFICIENCY, **{k: v for k, v in over.items() if ":" not in k}}
    if target["key"] != "p100":  # the bandwidth rule
        scale = P100["fp16_tflops"] / target["fp16_tflops"] * target["mem_gbs"] / P100["mem_gbs"]
        base = {f: v * scale for f, v in base.items()}
    own = {k.split(":", 1)[1]: v for k, v in over.items() if k.startswith(target["key"] + ":")}
    return {**base, **own}


def forward_gflops(build, image_size: int) -> float:
    """GFLOP of one forward pass of the module ``build()`` returns on one (3, S, S) image (torch's flop
    counter on the meta device: nothing is allocated or computed; 2 FLOPs per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build().eval()
        x = torch.empty(1, 3, image_size, image_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 1e9


def count_gflops(entry: dict) -> float:
    """GFLOP per image of an entry's descriptor model at its image size."""
    from kernel.models import build_model

    return forward_gflops(lambda: build_model(entry), entry["image_size"])


def projected_ms(gflop: float, family: str, target: dict = T4X2, efficiency: dict | None = None) -> float:
    """Projected milliseconds per image on one device of ``target`` in fp16 at the family's efficiency."""
    return gflop / (target["fp16_tflops"] * target_efficiency(target, efficiency)[family])


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
