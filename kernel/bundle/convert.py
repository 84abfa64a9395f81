"""Checkpoint conversions for shipping, each one checked on real descriptors before it is accepted.

Two conversions, both optional (:func:`convert_checkpoint`):

- *strip*: drop the training heads (``head.*``, ``metric_classify.*``: the sub-center ArcFace weights, 81,313 x 3
  x 512 floats, about 500 MB per real model) and any training payload around the state dict (optimizer state,
  epoch, config). The kept keys are untouched and stay in the original layout, so the result loads through the
  same strict loader. Descriptors must not change at all: the check compares them exactly.
- *fp16*: store every floating-point tensor in half precision (the model casts them back to fp32 on load). The
  check requires a per-image cosine of at least ``tolerance`` (default 0.999) between the descriptors of the
  original and the converted checkpoint.

The check batch is real photos (the Google-Landmarks samples bundled in ``kernel/demo/sample_data``) resized to the
model's input size, not noise: what is compared is what the kernel will compute.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from kernel.demo import SAMPLE_DIR  # the check photos
from kernel.errors import KernelError
from kernel.models.checkpoint import HEAD_PREFIXES

log = logging.getLogger(__name__)

DEFAULT_FP16_TOLERANCE = 0.999


class ConversionError(KernelError):
    """A converted checkpoint whose descriptors moved more than the stated tolerance."""


@dataclass
class Conversion:
    """What was done to one checkpoint, and how it was checked (goes into the build report)."""

    stripped_keys: list = field(default_factory=list)  # training-head keys removed
    stripped_params: int = 0  # their number of values
    dropped_payload: list = field(default_factory=list)  # non-weight top-level entries removed (optimizer, ...)
    fp16_tensors: int = 0  # floating tensors stored in half precision
    check: str = ""  # "exact" or "cosine>=<tol>"
    min_cosine: float | None = None  # over the check images
    max_abs_diff: float | None = None

    @property
    def changed(self) -> bool:
        return bool(self.stripped_keys or self.dropped_payload or self.fp16_tensors)

    def describe(self) -> str:
        parts = []
        if self.stripped_keys:
            parts.append(f"stripped {len(self.stripped_keys)} head keys ({self.stripped_params:,} values)")
        if self.dropped_payload:
            parts.append(f"dropped training payload ({', '.join(self.dropped_payload)})")
        if self.fp16_tensors:
            parts.append(f"fp16 ({self.fp16_tensors} tensors)")
        if not parts:
            return "copied unchanged"
        if self.check:
            parts.append(f"check {self.check}: min cosine {self.min_cosine:.6f}, max |diff| {self.max_abs_diff:.2e}")
        return "; ".join(parts)


def _state_dict_and_payload(obj) -> tuple[dict, list[str]]:
    """The state dict inside a checkpoint object, and the names of the other top-level entries."""
    from kernel.models import unwrap_state_dict

    sd = unwrap_state_dict(obj)
    payload = []
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        wrapper = next((k for k in ("model", "state_dict", "model_state_dict") if isinstance(obj.get(k), dict)), None)
        payload = sorted(str(k) for k in obj if k != wrapper)
    elif isinstance(obj, dict):
        payload = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    return sd, payload


def convert_checkpoint(obj, strip: bool, fp16: bool) -> tuple[dict | None, Conversion]:
    """Apply the requested conversions to a loaded checkpoint object.

    Returns ``(new_checkpoint, conversion)``; ``new_checkpoint`` is ``None`` when nothing changes (the original
    file is then shipped byte for byte). A converted checkpoint is ``{"model": state_dict}``.
    """
    conv = Conversion()
    if not strip and not fp16:
        return None, conv
    sd, payload = _state_dict_and_payload(obj)
    if strip:
        conv.stripped_keys = sorted(k for k in sd if k.startswith(HEAD_PREFIXES))
        conv.stripped_params = int(sum(sd[k].numel() for k in conv.stripped_keys))
        conv.dropped_payload = payload
        sd = {k: v for k, v in sd.items() if k not in set(conv.stripped_keys)}
    if fp16:
        out = {}
        for k, v in sd.items():
            if v.is_floating_point() and v.dtype != torch.float16:
                out[k] = v.to(torch.float16)
                conv.fp16_tensors += 1
            else:
                out[k] = v
        sd = out
    if not conv.changed:
        return None, conv
    return {"model": sd}, conv


def check_images(image_size: int, n: int = 4) -> torch.Tensor:
    """``n`` bundled sample photos resized to ``image_size`` and normalised with ImageNet mean/std: (n, 3, S, S)."""
    from PIL import Image

    from kernel.models import IMAGENET_MEAN, IMAGENET_STD

    photos = sorted(SAMPLE_DIR.glob("*.jpg"))[:n]
    if len(photos) < n:
        raise KernelError(f"{SAMPLE_DIR}: {len(photos)} sample photos for the conversion check, need {n}")
    batch = []
    for p in photos:
        im = Image.open(p).convert("RGB").resize((image_size, image_size), Image.BILINEAR)
        batch.append(np.asarray(im, dtype=np.float32))
    x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def descriptors(model, images: torch.Tensor) -> torch.Tensor:
    return model.eval()(images).float()


def compare(name: str, reference: torch.Tensor, converted: torch.Tensor, conv: Conversion,
            tolerance: float) -> Conversion:
    """Record and enforce the check: exact equality without fp16, per-image cosine >= tolerance with it."""
    diff = (reference - converted).abs().max().item() if reference.numel() else 0.0
    cos = torch.nn.functional.cosine_similarity(reference, converted, dim=1)
    conv.min_cosine = float(cos.min().item()) if cos.numel() else 1.0
    conv.max_abs_diff = float(diff)
    if conv.fp16_tensors:
        conv.check = f"cosine>={tolerance}"
        if not (conv.min_cosine >= tolerance):  # also catches NaN
            raise ConversionError(
                f"model '{name}': the fp16 checkpoint changes the descriptors too much: per-image cosine to the "
                f"original {conv.min_cosine:.6f} < tolerance {tolerance} (ship it in fp32: drop --fp16)")
    else:
        conv.check = "exact"
        if not torch.equal(reference, converted):
            raise ConversionError(
                f"model '{name}': stripping the training head changed the descriptors (max |diff| {diff:.3e}); "
                "the head must not take part in the descriptor")
    return conv
