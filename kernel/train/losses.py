"""Classification heads and margin losses of the 2020/2021 landmark solutions (docs/training.md#loss).

- :class:`SubcenterArcMargin`: the training head. Weight ``(n_classes * k, in_features)``, rows class-major
  (row ``c * k + j`` is sub-centre ``j`` of class ``c``), as the original ``ArcMarginProduct_subcenter``;
  returns the cosine to the *nearest* sub-centre of every class (max over the k sub-centres). ``k=1`` is a
  plain ArcFace head.
- :class:`ArcFaceLoss`: additive angular margin on the target class, scale ``s``, one margin for all classes
  (2020 retrieval: m=0.3, s=30) or one per class (2021: :func:`dynamic_margins`, s=45).
- :class:`SoftmaxHead` + :class:`SoftmaxLoss`: the plain softmax pre-training of the 2020 retrieval recipe.

Numerics: the head and the loss always run in float32 with autocast disabled (cosines are clamped away from
±1 before ``sqrt``/``acos``-like terms), so fp16/bf16 training cannot overflow or NaN here. Margins live in
buffers: everything follows the device of the inputs.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_EPS = 1e-6


def dynamic_margins(counts, a: float = 0.45, b: float = 0.05) -> np.ndarray:
    """Per-class ArcFace margins from training counts (docs/training.md#loss).

    ``x_c = n_c ** (-1/4)``; ``margin_c = b + a * (x_c - min x) / (max x - min x)``: the rarest class gets
    ``a + b`` (0.5), the most frequent ``b`` (0.05). All classes equally frequent: every margin is ``b``.
    """
    n = np.asarray(counts, dtype=np.float64)
    if n.ndim != 1 or n.size == 0:
        raise ValueError(f"counts must be a non-empty 1-d array, got shape {n.shape}")
    if (n <= 0).any():
        raise ValueError(f"every class needs a positive count ({int((n <= 0).sum())} classes have none)")
    x = n ** -0.25
    span = x.max() - x.min()
    if span == 0:
        return np.full_like(x, b)
    return b + a * (x - x.min()) / span


def _no_autocast(device_type: str):
    return torch.autocast(device_type=device_type, enabled=False)


class SubcenterArcMargin(nn.Module):
    """Sub-center ArcFace head: cosine between the L2-normalised feature and each class's nearest sub-centre."""

    def __init__(self, in_features: int, n_classes: int, k: int = 3):
        super().__init__()
        if n_classes < 1 or k < 1:
            raise ValueError(f"need n_classes >= 1 and k >= 1 (got {n_classes}, {k})")
        self.in_features, self.n_classes, self.k = in_features, n_classes, k
        self.weight = nn.Parameter(torch.empty(n_classes * k, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -stdv, stdv)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with _no_autocast(features.device.type):
            cos_all = F.linear(F.normalize(features.float(), dim=1), F.normalize(self.weight.float(), dim=1))
            return cos_all.view(-1, self.n_classes, self.k).amax(dim=2)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, n_classes={self.n_classes}, k={self.k}"


class ArcFaceLoss(nn.Module):
    """Cross-entropy over ``s * logits`` where the target logit ``cos θ`` becomes ``cos(θ + m_y)``.

    ``margins``: a float (one margin) or a per-class sequence (dynamic margins). As in the original code,
    where ``θ + m`` would pass π (``cos θ <= cos(π - m)``) the target logit is ``cos θ - m·sin(m)`` instead,
    which keeps it monotonic. Only the target column is changed, so memory stays ``O(B)`` beyond the logits.
    """

    def __init__(self, margins, s: float = 45.0, label_smoothing: float = 0.0):
        super().__init__()
        m = torch.as_tensor(np.atleast_1d(np.asarray(margins, dtype=np.float64)), dtype=torch.float32)
        if ((m < 0) | (m >= math.pi / 2)).any():
            raise ValueError("margins must lie in [0, pi/2)")
        self.register_buffer("margins", m, persistent=False)
        self.per_class = m.numel() > 1
        self.s = float(s)
        self.label_smoothing = float(label_smoothing)

    def target_logit(self, cos_t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        m = self.margins[target] if self.per_class else self.margins.expand_as(cos_t)
        cos_t = cos_t.clamp(-1 + _EPS, 1 - _EPS)
        sin_t = torch.sqrt((1.0 - cos_t * cos_t).clamp_min(_EPS))
        phi = cos_t * torch.cos(m) - sin_t * torch.sin(m)
        th = torch.cos(math.pi - m)
        mm = torch.sin(math.pi - m) * m
        return torch.where(cos_t > th, phi, cos_t - mm)

    def forward(self, cosine: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with _no_autocast(cosine.device.type):
            cosine = cosine.float()
            target = target.long()
            if self.per_class and cosine.shape[1] != self.margins.numel():
                raise ValueError(f"{cosine.shape[1]} classes in the logits but {self.margins.numel()} margins")
            idx = target.view(-1, 1)
            phi = self.target_logit(cosine.gather(1, idx).squeeze(1), target)
            logits = cosine.scatter(1, idx, phi.unsqueeze(1)) * self.s
            return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)


class SoftmaxHead(nn.Linear):
    """Plain linear classifier (softmax pre-training of the 2020 retrieval recipe)."""

    def __init__(self, in_features: int, n_classes: int):
        super().__init__(in_features, n_classes)
        self.n_classes = n_classes

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with _no_autocast(features.device.type):
            return F.linear(features.float(), self.weight.float(), self.bias.float())


class SoftmaxLoss(nn.Module):
    """Cross-entropy in float32 (the softmax counterpart of :class:`ArcFaceLoss`)."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = float(label_smoothing)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with _no_autocast(logits.device.type):
            return F.cross_entropy(logits.float(), target.long(), label_smoothing=self.label_smoothing)


def build_loss(spec: dict, class_counts) -> nn.Module:
    """Loss of a recipe step. ``spec``: ``{"type": "arcface", "s": 45, "margins": "dynamic", "a": .45,
    "b": .05}`` or ``{"type": "arcface", "s": 30, "m": 0.3}`` or ``{"type": "softmax"}``."""
    kind = spec.get("type")
    if kind == "softmax":
        return SoftmaxLoss(spec.get("label_smoothing", 0.0))
    if kind != "arcface":
        raise ValueError(f"unknown loss type {kind!r} (arcface | softmax)")
    if spec.get("margins") == "dynamic":
        margins = dynamic_margins(class_counts, spec.get("a", 0.45), spec.get("b", 0.05))
    else:
        margins = spec["m"]
    return ArcFaceLoss(margins, s=spec.get("s", 45.0), label_smoothing=spec.get("label_smoothing", 0.0))
