"""Corner-Cutmix and its dual-stream loss (2020 retrieval 3rd place, docs/training.md#the-2020-retrieval-seeds).

A resized copy of image A is pasted onto a random corner of image B; the mixed image is labelled
0.5·A + 0.5·B. Training is dual-stream: the plain batch and the mixed batch go through the same weights and

    loss = L(plain, y) + 0.5·L(mix, y_A) + 0.5·L(mix, y_B)

with ``L`` the step's loss (ArcFace or softmax), so margins apply to each label of the mix separately.
Within a batch, B is the batch itself and A a random permutation of it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")


def paste_corner(base: torch.Tensor, patch: torch.Tensor, side: int, corner: int) -> torch.Tensor:
    """Resize ``patch`` (C, H, W) to ``side`` x ``side`` and paste it onto corner ``corner`` (index into
    :data:`CORNERS`) of a copy of ``base`` (C, H, W)."""
    h, w = base.shape[-2:]
    small = F.interpolate(patch[None].float(), size=(side, side), mode="bilinear", align_corners=False,
                          antialias=True)[0].to(base.dtype)
    y0 = 0 if corner in (0, 1) else h - side
    x0 = 0 if corner in (0, 2) else w - side
    out = base.clone()
    out[:, y0 : y0 + side, x0 : x0 + side] = small
    return out


def corner_cutmix(images: torch.Tensor, targets: torch.Tensor, scale=(0.3, 0.6), generator=None):
    """Mix a batch (B, C, S, S). Returns ``(mixed, targets_a, targets_b, boxes)``: ``targets_b`` are the
    base images' labels (= ``targets``), ``targets_a`` the pasted images' labels, ``boxes`` (B, 4) the
    pasted regions as ``(y0, x0, y1, x1)``.

    ``scale``: the pasted side as a fraction of the image side, uniform in the range **(our reading**: the
    source gives no range; the paste must stay clearly smaller than B so both labels remain visible).
    """
    b, _, h, w = images.shape
    if h != w:
        raise ValueError(f"corner_cutmix expects square images, got {h}x{w}")
    perm = torch.randperm(b, generator=generator)
    lo, hi = scale
    sides = (lo + (hi - lo) * torch.rand(b, generator=generator)).mul(h).round().clamp(1, h).long()
    corners = torch.randint(0, 4, (b,), generator=generator)
    mixed = torch.empty_like(images)
    boxes = torch.empty(b, 4, dtype=torch.long)
    for i in range(b):
        side, corner = int(sides[i]), int(corners[i])
        mixed[i] = paste_corner(images[i], images[int(perm[i])], side, corner)
        y0 = 0 if corner in (0, 1) else h - side
        x0 = 0 if corner in (0, 2) else w - side
        boxes[i] = torch.tensor([y0, x0, y0 + side, x0 + side])
    return mixed, targets[perm.to(targets.device)], targets, boxes


def dual_stream_loss(loss_fn, logits_plain, targets, logits_mix, targets_a, targets_b) -> torch.Tensor:
    """``L(plain, y) + 0.5·L(mix, y_A) + 0.5·L(mix, y_B)``."""
    return loss_fn(logits_plain, targets) + 0.5 * loss_fn(logits_mix, targets_a) + 0.5 * loss_fn(logits_mix, targets_b)
