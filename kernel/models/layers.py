"""Layers shared by the model families, named and keyed as in the 2021 winning solution's code.

Parameter names (``p``, ``d0``, ``conv1``, ``bn`` ...) are those of the original modules, so their
checkpoints load without renaming.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# ImageNet statistics on the 0-255 scale (docs/architectures.md#input-images); images are normalised outside the models.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


class GeM(nn.Module):
    """Generalised-mean pooling with a trainable exponent ``p`` (init 3), output (B, C, 1, 1)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.to(x.dtype)
        return x.clamp(min=self.eps).pow(p).mean(dim=(-2, -1), keepdim=True).pow(1.0 / p)


class MultiAtrousModule(nn.Module):
    """DOLG local branch: three dilated 3x3 convs ('same' padding), concatenated, 1x1 conv, ReLU."""

    def __init__(self, in_chs: int, out_chs: int, dilations, mid_chs: int = 512):
        super().__init__()
        d = list(dilations)
        if len(d) != 3:
            raise ValueError(f"MultiAtrousModule needs three dilations, got {d}")
        self.d0 = nn.Conv2d(in_chs, mid_chs, kernel_size=3, dilation=d[0], padding="same")
        self.d1 = nn.Conv2d(in_chs, mid_chs, kernel_size=3, dilation=d[1], padding="same")
        self.d2 = nn.Conv2d(in_chs, mid_chs, kernel_size=3, dilation=d[2], padding="same")
        self.conv1 = nn.Conv2d(mid_chs * 3, out_chs, kernel_size=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.d0(x), self.d1(x), self.d2(x)], dim=1)
        return self.relu(self.conv1(x))


class SpatialAttention2d(nn.Module):
    """DOLG spatial attention: 1x1 conv + BN, the channel-L2-normalised map weighted by
    softplus(1x1 conv(ReLU(.)) -> 1 channel)."""

    def __init__(self, in_chs: int, mid_chs: int = 1024):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, mid_chs, 1, 1)
        self.bn = nn.BatchNorm2d(mid_chs)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(mid_chs, 1, 1, 1)
        self.softplus = nn.Softplus(beta=1, threshold=20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv1(x))
        normed = F.normalize(x, p=2, dim=1)
        score = self.softplus(self.conv2(self.act1(x)))
        return score * normed


class OrthogonalFusionPool(nn.Module):
    """DOLG orthogonal fusion followed by the average pool, computed without the (B, 2C, H, W) map.

    The original code builds ``cat([f_l - proj(f_l on f_g), f_g repeated], dim=1)`` at every position and
    average-pools it. Both the projection and the pool are linear in ``f_l``, so pooling first gives the same
    vector: ``[m - (m . f_g) / |f_g|**power * f_g, f_g]`` with ``m`` the spatial mean of ``f_l``.

    ``power`` is the exponent of ``|f_g|`` in the projection's denominator. The original code divides by
    ``|f_g|`` (power 1), not by ``|f_g|**2`` as an exact orthogonal projection would; power 1 reproduces the
    original checkpoints' descriptors (tests/test_models_layouts.py checks this against the reference).
    """

    def __init__(self, power: float = 1.0):
        super().__init__()
        self.power = power

    def forward(self, f_l: torch.Tensor, f_g: torch.Tensor) -> torch.Tensor:
        m = f_l.mean(dim=(-2, -1))  # (B, C)
        dot = (m * f_g).sum(dim=1, keepdim=True)
        norm = f_g.norm(dim=1, keepdim=True).pow(self.power)
        return torch.cat([m - dot / norm * f_g, f_g], dim=1)


def make_neck(in_features: int, embedding_dim: int = 512) -> nn.Sequential:
    """FC - BatchNorm1d - PReLU, keyed ``neck.0`` / ``neck.1`` / ``neck.2`` as in the original code."""
    return nn.Sequential(nn.Linear(in_features, embedding_dim, bias=True), nn.BatchNorm1d(embedding_dim), nn.PReLU())


def set_stem_stride(features: nn.Module, stride: int) -> None:
    """Set an EfficientNet's stem stride (the original code assigns ``conv_stem.stride`` after building)."""
    if stride not in (1, 2):
        raise ValueError(f"stem_stride must be 1 or 2, got {stride}")
    features.conv_stem.stride = (stride, stride)
