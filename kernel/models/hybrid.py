"""Hybrid-Swin-Transformer (docs/architectures.md#hybrid-swin-transformer): an EfficientNet truncated at one feature level replaces Swin's patch
embedding; a 1x1 conv projects its feature map to the Swin embedding width, landing exactly on Swin's token
grid. Swin's pooled output goes through the FC-BN-PReLU neck to 512.

Keys match the 2021 training code (timm 0.4.12): the Swin under ``backbone.*``, the EfficientNet under
``backbone.patch_embed.backbone.*``, the projection ``backbone.patch_embed.proj``, the neck ``neck.*``; the
training head ``head.weight`` is not part of this module. :meth:`Hybrid.checkpoint_filter` moves the old timm
Swin layout to current timm's (:mod:`kernel.models.swin_layout`).
"""
from __future__ import annotations

import re

import timm
import torch
import torch.nn.functional as F
from torch import nn

from kernel.models import swin_layout
from kernel.models.layers import make_neck, set_stem_stride


class HybridEmbed(nn.Module):
    """EfficientNet stem + blocks up to one feature level, then a 1x1 conv to the Swin width (NHWC out).

    Only the blocks that feed the chosen level are kept (the original code ran the whole network and threw
    the deeper stages away); :meth:`Hybrid.checkpoint_filter` drops their weights.
    """

    def __init__(self, embedder: str, feature_level: int, embed_dim: int, stem_stride: int, embedder_args=None):
        super().__init__()
        self.backbone = timm.create_model(
            embedder, pretrained=False, features_only=True, out_indices=(feature_level,), **(embedder_args or {})
        )
        set_stem_stride(self.backbone, stem_stride)
        module = self.backbone.feature_info.module_name()[0]  # e.g. "blocks.4"
        match = re.fullmatch(r"blocks\.(\d+)", module)
        if match is None:
            raise ValueError(f"{embedder}: feature level {feature_level} is not a block output ({module})")
        self.num_blocks = int(match.group(1)) + 1
        self.backbone.blocks = self.backbone.blocks[: self.num_blocks]
        self.reduction = self.backbone.feature_info.reduction()[0] * stem_stride // 2
        self.proj = nn.Conv2d(self.backbone.feature_info.channels()[0], embed_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        x = b.bn1(b.conv_stem(x))
        x = b.blocks(x)
        return self.proj(x).permute(0, 2, 3, 1)


class Hybrid(nn.Module):
    family = "hybrid"
    head_key = "head"  # the original checkpoints' training head (not part of this module)

    def __init__(
        self,
        backbone: str,
        embedder: str,
        feature_level: int,
        image_size: int,
        stem_stride: int = 2,
        embedding_dim: int = 512,
        backbone_args: dict | None = None,
        embedder_args: dict | None = None,
    ):
        super().__init__()
        # Swin at its default resolution; its patch embedding (and that embedding's norm) is replaced
        self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0, **(backbone_args or {}))
        grid = tuple(self.backbone.patch_embed.grid_size)
        embed = HybridEmbed(embedder, feature_level, self.backbone.embed_dim, stem_stride, embedder_args)
        got = (image_size // embed.reduction, image_size // embed.reduction)
        if image_size % embed.reduction or got != grid:
            raise ValueError(
                f"{embedder} level {feature_level} (stride {embed.reduction}) on {image_size}px gives a "
                f"{got[0]}x{got[1]} map, but {backbone} expects a {grid[0]}x{grid[1]} token grid"
            )
        self.backbone.patch_embed = embed
        self.neck = make_neck(self.backbone.num_features, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.backbone.forward_features(x)  # (B, H, W, C), after Swin's final norm
        return F.normalize(self.neck(x.mean(dim=(1, 2))), dim=1)

    @staticmethod
    def checkpoint_filter(state_dict: dict, model: "Hybrid") -> dict:
        """Adapt an original hybrid checkpoint to this module.

        - drops the training head (``head.*``) and ``global_pool.p`` (a GeM the original ``Net`` built but
          never called: Swin pools its tokens itself);
        - drops the embedder's blocks past the feature level (never used) and any classifier end it has;
        - moves old timm's stage-end patch merging (``layers.i.downsample``) to the start of the next stage
          (:func:`kernel.models.swin_layout.old_to_new`) when the Swin part is in old timm's layout (the stored
          ``relative_position_index`` / ``attn_mask`` buffers are dropped by ``load_weights`` for every model).
        Shapes of ``relative_position_bias_table`` are checked first and named: a wrong window size is a wrong
        architecture, an error, never a resample.
        """
        embed_prefix = "backbone.patch_embed."
        n = model.backbone.patch_embed.num_blocks
        out, swin = {}, {}
        for k, v in state_dict.items():
            if k.startswith(Hybrid.head_key + ".") or k == "global_pool.p":
                continue
            if k.startswith(embed_prefix + "backbone."):
                rest = k[len(embed_prefix + "backbone."):]
                m = re.match(r"blocks\.(\d+)\.", rest)
                if (m and int(m.group(1)) >= n) or rest.split(".")[0] in ("conv_head", "bn2", "classifier"):
                    continue
                out[k] = v
            elif k.startswith(embed_prefix):
                out[k] = v
            elif k.startswith("backbone."):
                swin[k[len("backbone."):]] = v
            else:
                out[k] = v
        own = model.backbone.state_dict()
        bad = [
            f"backbone.{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
            for k, v in swin.items()
            if k.endswith("relative_position_bias_table") and k in own and tuple(v.shape) != tuple(own[k].shape)
        ]
        if bad:
            raise ShapeMismatch(bad)
        rename = swin_layout.old_to_new if swin_layout.is_old_layout(swin) else (lambda k: k)
        out.update({f"backbone.{rename(k)}": v for k, v in swin.items()})  # load_weights drops the derived buffers
        return out


class ShapeMismatch(ValueError):
    """Raised by a checkpoint filter when a tensor cannot belong to this architecture."""

    def __init__(self, lines):
        super().__init__("; ".join(lines))
        self.lines = list(lines)
