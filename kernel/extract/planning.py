"""How a call holds its models: which models share a pass (:func:`plan_groups`) and each model's first
batch size (:func:`batch_sizes`)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from kernel.errors import KernelError

log = logging.getLogger(__name__)

DEFAULT_BATCH = {"cuda": 32, "cpu": 8}


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
    """Split the models into groups held at the same time (most valuable first, ``priority``, docs/architectures.md#priority).

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


def batch_sizes(names: list[str], batch_size, device: torch.device) -> dict[str, int]:
    """Each model's first batch size: ``batch_size`` (an int, or ``{model: int}`` for some models), the
    device's default (:data:`DEFAULT_BATCH`) for the others."""
    default = DEFAULT_BATCH["cuda" if device.type == "cuda" else "cpu"]
    sizes = batch_size if isinstance(batch_size, dict) else {}
    per_model = {n: int(sizes.get(n, default) if sizes else (batch_size or default)) for n in names}
    if min(per_model.values()) < 1:
        raise KernelError("batch size must be >= 1")
    return per_model
