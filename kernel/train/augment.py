"""The 2021 training augmentation (docs/training.md#what-is-trained-the-definitions) with torchvision transforms v2.

Why torchvision v2 and not albumentations (which the original configs used): it is already installed (timm
depends on it), it works on uint8 tensors inside DataLoader workers, and every step of the 2021 pipeline has
an exact counterpart, so no second image library enters the kernel's requirements:

======================================  ===================================================================
original (albumentations)               here
======================================  ===================================================================
HorizontalFlip(p=0.5)                   ``v2.RandomHorizontalFlip(0.5)``
ImageCompression(quality 99-100)        :class:`JpegQuality` (a Pillow JPEG round trip; torchvision's own
                                        ``v2.JPEG`` sits on its deprecated image codecs)
ShiftScaleRotate(0.2, 0.2, 10,          ``v2.RandomApply([v2.RandomAffine(10, translate=(0.2, 0.2),
border 0, p=0.7)                        scale=(0.8, 1.2), interpolation=BILINEAR, fill=0)], p=0.7)``
                                        (albumentations' default interpolation is cv2 INTER_LINEAR;
                                        torchvision's would be nearest-neighbour)
Resize(S, S)                            :class:`SquareResize`: the kernel's inference resize itself
                                        (:func:`kernel.data.decode.resize_square`, cv2 INTER_LINEAR, no
                                        antialiasing), so a model trains on the resize it is run with
Cutout(1 hole, 0.4*S, p=0.5)            :class:`Cutout` (old albumentations geometry, below)
======================================  ===================================================================

Images are then cast to float on the 0-255 scale and normalised with ImageNet mean/std (docs/architectures.md#input-images).
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from kernel.data.decode import resize_square
from kernel.models import IMAGENET_MEAN, IMAGENET_STD


class SquareResize(nn.Module):
    """uint8 (3, H, W) tensor -> (3, S, S) with :func:`kernel.data.decode.resize_square` (cv2 INTER_LINEAR,
    no antialiasing: albumentations' ``Resize`` in the originals, and the kernel's inference resize)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        rgb = np.ascontiguousarray(img.permute(1, 2, 0).numpy())
        return torch.from_numpy(np.ascontiguousarray(resize_square(rgb, self.size))).permute(2, 0, 1)


class Cutout(nn.Module):
    """One square hole of side ``int(fraction * S)`` filled with ``fill``, with probability ``p``.

    Geometry of the albumentations ``Cutout`` the original configs used: the hole's centre is uniform over the
    image and the hole is clipped at the borders, so its visible part is *up to* ``fraction * S`` wide.
    Works on (..., H, W) tensors of any dtype (applied after the resize, before normalisation).
    """

    def __init__(self, fraction: float = 0.4, p: float = 0.5, fill: float = 0.0):
        super().__init__()
        self.fraction, self.p, self.fill = fraction, p, fill

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= self.p:
            return img
        h, w = img.shape[-2:]
        hh, hw = int(h * self.fraction), int(w * self.fraction)
        cy, cx = int(torch.randint(0, h, ())), int(torch.randint(0, w, ()))
        y0, y1 = max(cy - hh // 2, 0), min(cy - hh // 2 + hh, h)
        x0, x1 = max(cx - hw // 2, 0), min(cx - hw // 2 + hw, w)
        img = img.clone()
        img[..., y0:y1, x0:x1] = self.fill
        return img


class JpegQuality(nn.Module):
    """Re-encode a uint8 (3, H, W) tensor as JPEG with a quality drawn uniformly from ``[low, high]``."""

    def __init__(self, low: int = 99, high: int = 100):
        super().__init__()
        self.low, self.high = low, high

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        quality = int(torch.randint(self.low, self.high + 1, ()))
        buf = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


def normalize() -> v2.Compose:
    """uint8 (3, H, W) -> float32 normalised with ImageNet mean/std on the 0-255 scale."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=False), v2.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD))])


def train_transform(size: int, cutout: float = 0.4) -> v2.Compose:
    """The 2021 training pipeline at ``size`` x ``size`` (docs/training.md#what-is-trained-the-definitions)."""
    return v2.Compose([
        v2.RandomHorizontalFlip(p=0.5),
        JpegQuality(99, 100),
        v2.RandomApply([v2.RandomAffine(degrees=10, translate=(0.2, 0.2), scale=(0.8, 1.2),
                                        interpolation=v2.InterpolationMode.BILINEAR, fill=0)], p=0.7),
        SquareResize(size),
        Cutout(cutout, p=0.5),
        normalize(),
    ])


def eval_transform(size: int) -> v2.Compose:
    """Validation: the kernel's inference resize to a square, normalise."""
    return v2.Compose([SquareResize(size), normalize()])
