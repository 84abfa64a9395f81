"""DOLG-EfficientNet (docs/architectures.md#dolg-efficientnet): EfficientNet encoder, multi-atrous local branch with spatial attention on the
stride-16 features, GeM global branch on the last stage, orthogonal fusion, FC-BN-PReLU neck to 512.

State-dict keys match the 2021 training code (``backbone.*``, ``mam.*``, ``attention2d.*``, ``conv_g``,
``bn_g``, ``global_pool.p``, ``neck.*``; its training head ``head.weight`` is not part of this module).
"""
from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from kernel.models.layers import (
    GeM,
    MultiAtrousModule,
    OrthogonalFusionPool,
    SpatialAttention2d,
    make_neck,
    set_stem_stride,
)


class DOLG(nn.Module):
    family = "dolg"
    head_key = "head"  # the original checkpoints' sub-center ArcFace training head (not part of this module)

    def __init__(
        self,
        backbone: str,
        dilations=(6, 12, 18),
        stem_stride: int = 2,
        embedding_dim: int = 512,
        local_dim: int = 1024,
        atrous_dim: int = 512,
        backbone_args: dict | None = None,
    ):
        super().__init__()
        # the original code builds the feature pyramid with all five levels and uses the last two
        self.backbone = timm.create_model(
            backbone, pretrained=False, features_only=True, out_indices=(3, 4), **(backbone_args or {})
        )
        set_stem_stride(self.backbone, stem_stride)
        local_in, global_in = self.backbone.feature_info.channels()
        self.mam = MultiAtrousModule(local_in, local_dim, dilations, mid_chs=atrous_dim)
        self.attention2d = SpatialAttention2d(local_dim, mid_chs=local_dim)
        self.conv_g = nn.Conv2d(global_in, local_dim, kernel_size=1)
        self.bn_g = nn.BatchNorm2d(local_dim, eps=1e-3, momentum=0.1)
        self.act_g = nn.SiLU(inplace=True)
        self.global_pool = GeM(p=3.0)
        self.fusion = OrthogonalFusionPool()
        self.neck = make_neck(2 * local_dim, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_l, x_g = self.backbone(x)
        x_l = self.attention2d(self.mam(x_l))
        x_g = self.global_pool(self.act_g(self.bn_g(self.conv_g(x_g))))[:, :, 0, 0]
        fused = self.fusion(x_l, x_g)
        return F.normalize(self.neck(fused), dim=1)

    @staticmethod
    def checkpoint_filter(state_dict: dict, model: "DOLG") -> dict:
        """Drop the sub-center ArcFace training head."""
        return {k: v for k, v in state_dict.items() if not k.startswith(DOLG.head_key + ".")}
