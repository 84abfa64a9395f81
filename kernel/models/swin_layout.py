"""Where a Swin stage's patch merging sits in a state dict: old timm or current timm.

Old timm (0.4.12: the 2021 training code, hence the published hybrid checkpoints and every ``model.pth``
that ``kernel.train`` writes) ends stage ``i`` with its patch merging, ``layers.i.downsample``; stage 0 has
one, the last stage none. Current timm starts stage ``i + 1`` with it, ``layers.{i+1}.downsample``; stage 0
has none. The same tensor, e.g.::

    old: backbone.layers.0.downsample.reduction.weight
    new: backbone.layers.1.downsample.reduction.weight

Only the stage number of ``downsample`` keys changes; every other key is the same in both layouts.
"""
from __future__ import annotations

import re

_DOWNSAMPLE = re.compile(r"^(|.*\.)(layers\.)(\d+)(\.downsample\..*)$")


def _shift(key: str, by: int) -> str:
    m = _DOWNSAMPLE.match(key)
    if m is None:
        return key
    return f"{m.group(1)}{m.group(2)}{int(m.group(3)) + by}{m.group(4)}"


def old_to_new(key: str) -> str:
    """``backbone.layers.0.downsample.reduction.weight`` -> ``backbone.layers.1.downsample.reduction.weight``."""
    return _shift(key, +1)


def new_to_old(key: str) -> str:
    """``backbone.layers.1.downsample.reduction.weight`` -> ``backbone.layers.0.downsample.reduction.weight``."""
    return _shift(key, -1)


def is_derived_buffer(key: str) -> bool:
    """Swin's ``relative_position_index`` / ``attn_mask``: buffers that follow from the architecture, stored
    in some checkpoints, never loaded from one."""
    return "relative_position_index" in key or "attn_mask" in key


def is_old_layout(keys) -> bool:
    """Whether a Swin state dict's ``keys`` are in old timm's layout: only there does stage 0 hold a
    patch merging (the training head cannot tell, headless checkpoints have none)."""
    return any(m is not None and m.group(3) == "0" for m in map(_DOWNSAMPLE.match, keys))
