"""``python -m kernel.train cost``: projected GPU-hours of every recipe step, from its epochs, data set size,
image size and the network's FLOPs. A projection, not a measurement:

    hours = images x epochs_run x passes x 3 x GFLOP(forward, step's size) / (TFLOPS x efficiency) / 3.6e6

- ``images``: the step's data set (:data:`DATA_IMAGES`, or counted from ``--data DIR``'s CSVs);
  ``epochs_run``: ``stop_at`` or ``epochs``; ``passes``: 2 with Corner-Cutmix (dual stream), else 1.
- ``3 x`` forward FLOPs: the usual estimate of forward + backward (backward about twice the forward).
- ``GFLOP``: torch's flop counter on the step's network at its image size (meta device, nothing computed).
- ``TFLOPS``: the GPU's fp16 peak without tensor cores (:data:`kernel.budget.GPU_FP16_TFLOPS`); ``efficiency``:
  the fraction of it a family reaches (:data:`kernel.budget.DEFAULT_EFFICIENCY`, the inference assumptions of the
  kernel's budget; the plain Swin of hybrid step 1 counts as hybrid, the 2020 ResNets as hybrid too: dense
  convolutions, matmul-bound; our reading). Data loading, validation and checkpoints are not counted.
"""
from __future__ import annotations

import json
import logging
from functools import lru_cache

from kernel.errors import KernelError

log = logging.getLogger(__name__)

# images per epoch of each named data set (docs/kaggle.md#data-sets-and-their-sizes; GLDv2x: our estimate, ``--data`` counts it exactly)
DATA_IMAGES = {"gldv2": 4_132_914, "gldv2c": 1_580_470, "gldv2x": 3_200_000, "gldv2_clustered": 2_800_000}
FAMILY_EFFICIENCY = {"dolg": "dolg", "effnet": "effnet", "hybrid": "hybrid", "swin": "hybrid",
                     "retrieval2020": "hybrid"}


@lru_cache(maxsize=None)
def _gflops(arch_json: str) -> float:
    """Forward GFLOP of one architecture (cached by its JSON text: nested lists and dicts included)."""
    from kernel.budget import forward_gflops
    from kernel.train.nets import build_net

    arch = json.loads(arch_json)
    return forward_gflops(lambda: build_net(arch), arch["image_size"])


def step_cost(step: dict, gpu: str = "A100", images: dict | None = None, efficiency: dict | None = None) -> dict:
    """Projected cost of one resolved step (see module docstring)."""
    from kernel.budget import DEFAULT_EFFICIENCY, GPU_FP16_TFLOPS

    if gpu not in GPU_FP16_TFLOPS:
        raise KernelError(f"unknown GPU '{gpu}' (known: {', '.join(GPU_FP16_TFLOPS)})")
    n = {**DATA_IMAGES, **(images or {})}[step["data"]]
    epochs = step["stop_at"] or step["epochs"]
    gflop = _gflops(json.dumps(step["arch"], sort_keys=True))
    eff = {**DEFAULT_EFFICIENCY, **(efficiency or {})}[FAMILY_EFFICIENCY[step["arch"]["family"]]]
    ms = 3 * gflop / (GPU_FP16_TFLOPS[gpu] * eff) * (2 if step["cutmix"] else 1)
    return {"recipe": step["recipe"], "step": step["step"], "data": step["data"], "images": n, "epochs": epochs,
            "image_size": step["image_size"], "gflop": round(gflop, 1), "ms_per_image": round(ms, 3),
            "gpu_hours": n * epochs * ms / 3.6e6}


def recipe_costs(names=None, gpu: str = "A100", images: dict | None = None, efficiency: dict | None = None):
    """``[step_cost, ...]`` for every step of the recipes ``names`` (default: all)."""
    from kernel.train.recipes import RECIPES, get_recipe, resolve_step

    out = []
    for name in names or RECIPES:
        for k in range(1, len(get_recipe(name)["steps"]) + 1):
            out.append(step_cost(resolve_step(name, k), gpu, images, efficiency))
    return out


def count_images(data_dir) -> dict:
    """Exact images per named data set from the CSVs in ``data_dir`` (those present)."""
    from pathlib import Path

    from kernel.train.data import DATASETS, load_named

    counts = {}
    for name, spec in DATASETS.items():
        files = spec if isinstance(spec, tuple) else (spec,)
        if all((Path(data_dir) / f).is_file() for f in files):
            counts[name] = len(load_named(data_dir, name))
    return counts
