"""Pure EfficientNet (the 2020 recognition 3rd-place layout, docs/architectures.md#pure-efficientnet): EfficientNet with its classifier removed
(global average pool), FC to 512, Swish. The descriptor is that output, L2-normalised.

Keys match the original module (``enet.*`` from a geffnet backbone, whose block layout timm shares;
``feat.*``; the training head ``metric_classify.weight`` is not part of this module).
"""
from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from kernel.models.layers import set_stem_stride


class EffNet(nn.Module):
    family = "effnet"
    head_key = "metric_classify"  # the original checkpoints' ArcFace training head (not part of this module)

    def __init__(self, backbone: str, stem_stride: int = 2, embedding_dim: int = 512, backbone_args: dict | None = None):
        super().__init__()
        self.enet = timm.create_model(backbone, pretrained=False, num_classes=0, **(backbone_args or {}))
        set_stem_stride(self.enet, stem_stride)
        self.feat = nn.Linear(self.enet.num_features, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(F.silu(self.feat(self.enet(x))), dim=1)

    @staticmethod
    def checkpoint_filter(state_dict: dict, model: "EffNet") -> dict:
        """Drop the ArcFace training head."""
        return {k: v for k, v in state_dict.items() if not k.startswith(EffNet.head_key + ".")}
