"""Loading the checkpoints the original training code wrote, strictly.

What is adapted (in one place per family, ``<Family>.checkpoint_filter``, as timm does):
- wrappers ``{"model": sd}``, ``{"state_dict": sd}``, ``{"model_state_dict": sd}`` and ``module.`` prefixes;
- training heads (:data:`HEAD_PREFIXES`: ``head.*``, ``metric_classify.*``) are dropped;
- derived buffers (Swin's ``relative_position_index`` / ``attn_mask``) are never loaded;
- old timm Swin layout (patch merging at the end of a stage) is moved to current timm's.
Everything else is strict: a missing or unexpected key or a wrong shape raises :class:`CheckpointError`
naming the model, the file and the offending keys.
"""
from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from kernel.errors import KernelError
from kernel.models.dolg import DOLG
from kernel.models.effnet import EffNet
from kernel.models import swin_layout
from kernel.models.hybrid import Hybrid, ShapeMismatch

log = logging.getLogger(__name__)

WRAPPER_KEYS = ("model", "state_dict", "model_state_dict")
#: state-dict key prefixes of the original checkpoints' training heads (each family's ``head_key``):
#: ``("head.", "metric_classify.")``
HEAD_PREFIXES = tuple(sorted({f"{cls.head_key}." for cls in (DOLG, Hybrid, EffNet)}))
_MAX_LISTED = 8


class CheckpointError(KernelError):
    """A checkpoint that does not fit its model (names model, file and keys)."""


# ``--trust-checkpoint``: full unpickling allowed for every checkpoint of this process (set by the CLI, logged)
_TRUST_ALL = False


def trust_all_checkpoints(on: bool = True) -> None:
    """``--trust-checkpoint``: let checkpoints that hold more than tensors load with full unpickling
    (which runs whatever code the file names). Off by default; logged when set."""
    global _TRUST_ALL
    _TRUST_ALL = bool(on)
    if on:
        log.warning("--trust-checkpoint: checkpoints that hold more than tensors will be unpickled in full; "
                    "a malicious file can run code")


def read_checkpoint(path: str | Path, trusted: bool = False) -> dict:
    """``torch.load`` on the CPU with clear errors, always with ``weights_only=True`` first.

    A checkpoint that holds more than tensors and plain containers (pickled optimiser or config objects)
    needs full unpickling, which runs any code the file names. It is loaded that way only when ``trusted``
    (its sha256 is pinned in the manifest and matched) or ``--trust-checkpoint`` was given; otherwise it is
    refused with :class:`CheckpointError` saying so. Nothing is ever unpickled in full as a silent fallback.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: checkpoint file is empty")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, AttributeError, ModuleNotFoundError, TypeError) as first:
        if "Weights only load failed" not in str(first) and not isinstance(first, (AttributeError, ModuleNotFoundError)):
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({first})") from None
        if not (trusted or _TRUST_ALL):
            raise CheckpointError(
                f"{path}: holds objects beyond tensors, which only full unpickling can load, and unpickling "
                f"can run code: refused. Pin the file's sha256 in the manifest if you trust it, or pass "
                f"--trust-checkpoint") from None
        log.warning("%s: holds non-tensor objects; loading it with full unpickling (%s)", path,
                    "sha256 pinned in the manifest" if trusted else "--trust-checkpoint")
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint, truncated or corrupt? ({type(exc).__name__}: {exc})"
        ) from None


def unwrap_state_dict(obj) -> dict:
    """Find the state dict inside the usual wrappers and strip ``module.`` (DataParallel/DDP) prefixes."""
    for _ in range(3):
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("no state dict found (expected tensors, possibly under 'model'/'state_dict'/'model_state_dict')")
    out = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            continue
        while k.startswith("module."):
            k = k[len("module."):]
        out[k] = v
    return out


def _listing(keys) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def load_weights(model: nn.Module, source, name: str | None = None, trusted: bool = False) -> nn.Module:
    """Load an original-layout checkpoint (path or state dict) into a model from :func:`build_model`.

    Returns the model. Raises :class:`CheckpointError` naming the model, the file and the offending keys.
    ``trusted``: see :func:`read_checkpoint`.
    """
    name = name or getattr(model, "name", type(model).__name__)
    origin = str(source) if isinstance(source, (str, Path)) else "<state dict>"
    obj = read_checkpoint(source, trusted) if isinstance(source, (str, Path)) else source
    try:
        sd = unwrap_state_dict(obj)
    except ValueError as exc:
        raise CheckpointError(f"model '{name}': {origin}: {exc}") from None
    try:
        sd = type(model).checkpoint_filter(sd, model)
    except ShapeMismatch as exc:
        raise CheckpointError(f"model '{name}': {origin}: wrong shapes: {exc}") from None
    # buffers the model computes itself are never taken from a checkpoint
    sd = {k: v for k, v in sd.items() if not swin_layout.is_derived_buffer(k)}
    own = model.state_dict()
    missing = set(own) - set(sd)
    unexpected = set(sd) - set(own)
    wrong = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(sd) & set(own))
        if tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} wrong shapes: {'; '.join(wrong[:_MAX_LISTED])}")
    if problems:
        raise CheckpointError(f"model '{name}': {origin} does not fit its architecture: " + " | ".join(problems))
    model.load_state_dict(sd, strict=True)
    return model
