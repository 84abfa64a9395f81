"""Training checkpoints: the original layout for the kernel, full state for resuming, weight transfer
between recipe steps.

Files a step writes into its output folder (every write atomic: temporary file, fsync, ``os.replace``):

- ``model.pth``: ``{"model": state dict in the original training layout (training head included),
  "class_map": [landmark ids in class order], "recipe", "step", "epoch", "arch", "metrics"}``.
  :func:`kernel.models.load_weights` reads it directly (it unwraps ``"model"`` and drops the head).
  Hybrid / Swin state dicts are written in old timm's layout (patch merging at the *end* of stage i,
  ``layers.i.downsample``, :mod:`kernel.models.swin_layout`), the layout of the published checkpoints that
  the zoo adapts on loading.
- ``last.pth``: the same plus optimiser, scheduler, grad-scaler and sampler state, for ``--resume``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kernel.errors import KernelError
from kernel.models.swin_layout import is_derived_buffer, new_to_old, old_to_new
from kernel.files import atomic_write

log = logging.getLogger(__name__)

_SWIN_FAMILIES = ("hybrid", "swin")


def to_original(state_dict: dict, family: str) -> dict:
    """Current-timm keys -> the original training layout (Swin patch merging moved to the end of the
    previous stage, :func:`kernel.models.swin_layout.new_to_old`)."""
    if family not in _SWIN_FAMILIES:
        return dict(state_dict)
    return {new_to_old(k): v for k, v in state_dict.items()}


def from_original(state_dict: dict, family: str) -> dict:
    """Inverse of :func:`to_original` (drops Swin's derived ``relative_position_index`` / ``attn_mask``)."""
    if family not in _SWIN_FAMILIES:
        return dict(state_dict)
    return {old_to_new(k): v for k, v in state_dict.items() if not is_derived_buffer(k)}


def atomic_save(obj, path: str | Path) -> Path:
    """``torch.save`` that never leaves a half-written file (see :func:`kernel.files.atomic_write`)."""
    path = Path(path)
    atomic_write(path, lambda fh: torch.save(obj, fh))
    return path


def model_record(net: nn.Module, class_map, **meta) -> dict:
    """The ``model.pth`` payload: original-layout state dict + class map + whatever ``meta`` holds."""
    sd = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    return {"model": to_original(sd, net.family), "class_map": list(class_map.landmark_ids), **meta}


def load_record(path: str | Path) -> dict:
    from kernel.models import read_checkpoint

    obj = read_checkpoint(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise KernelError(f"{path}: not a training checkpoint (no 'model' state dict)")
    return obj


@dataclass
class TransferReport:
    what: str
    loaded: list = field(default_factory=list)
    shape_mismatch: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    unused: list = field(default_factory=list)
    popped: list = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.what}: {len(self.loaded)} tensors loaded, {len(self.missing)} left at init "
                f"({len(self.shape_mismatch)} of them for shape), {len(self.unused)} unused, "
                f"{len(self.popped)} popped")


def transfer(module: nn.Module, state_dict: dict, pop=(), min_fraction: float = 0.5,
             what: str = "transfer") -> TransferReport:
    """Load the tensors of ``state_dict`` whose name and shape match ``module``'s (a recipe step starting from
    the previous one: a new head size, a swapped patch embedding, an inserted EfficientNet block keep their
    init). ``pop``: name substrings never loaded (the original configs' ``pop_weights``). Raises
    :class:`KernelError` when fewer than ``min_fraction`` of the module's tensors could be loaded (wrong
    checkpoint)."""
    own = module.state_dict()
    rep = TransferReport(what)
    new = {}
    for k, v in state_dict.items():
        if any(p in k for p in pop):
            rep.popped.append(k)
        elif k not in own:
            rep.unused.append(k)
        elif tuple(v.shape) != tuple(own[k].shape):
            rep.shape_mismatch.append(f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}")
        else:
            new[k] = v
            rep.loaded.append(k)
    rep.missing = sorted(set(own) - set(new))
    if len(rep.loaded) < min_fraction * len(own):
        raise KernelError(f"{what}: only {len(rep.loaded)} of {len(own)} tensors match "
                          f"(first mismatches: {(rep.shape_mismatch + rep.missing)[:3]}); wrong checkpoint?")
    module.load_state_dict(new, strict=False)
    log.info(rep.summary())
    for line in rep.shape_mismatch[:5]:
        log.info("  kept init (shape): %s", line)
    return rep
