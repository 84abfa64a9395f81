"""The model zoo: the nine ensemble members (docs/architectures.md#the-ensemble), built from manifest entries on timm backbones
(``pretrained=False``), loading the checkpoints the original training code wrote.

``forward(x)`` takes a batch normalised outside the model with :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`
(0-255 scale), float (B, 3, S, S), and returns L2-normalised (B, 512) descriptors.
"""
from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from kernel.errors import KernelError
from kernel.files import sha256_file
from kernel.models.checkpoint import (CheckpointError, load_weights, read_checkpoint,
                                     trust_all_checkpoints, unwrap_state_dict)
from kernel.models.dolg import DOLG
from kernel.models.effnet import EffNet
from kernel.models.hybrid import Hybrid
from kernel.models.layers import IMAGENET_MEAN, IMAGENET_STD
from kernel.models.manifest import load_manifest, select, validate_entry, validate_manifest

log = logging.getLogger(__name__)

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "CheckpointError", "build_model", "load_model", "load_weights",
    "load_manifest", "validate_manifest", "validate_entry", "select", "read_checkpoint", "unwrap_state_dict",
    "sha256_file", "trust_all_checkpoints", "DOLG", "Hybrid", "EffNet",
]


def build_model(entry: dict) -> nn.Module:
    """Build the descriptor model of one manifest entry (random init; see :func:`load_model`)."""
    validate_entry(entry)
    family = entry["family"]
    common = dict(stem_stride=entry["stem_stride"], embedding_dim=entry.get("embedding_dim", 512),
                  backbone_args=entry.get("backbone_args"))
    try:
        if family == "dolg":
            model = DOLG(entry["backbone"], dilations=entry["dilations"], local_dim=entry.get("local_dim", 1024),
                         atrous_dim=entry.get("atrous_dim", 512), **common)
        elif family == "hybrid":
            model = Hybrid(entry["backbone"], entry["embedder"], entry["feature_level"], entry["image_size"],
                           embedder_args=entry.get("embedder_args"), **common)
        else:
            model = EffNet(entry["backbone"], **common)
    except (RuntimeError, ValueError, TypeError) as exc:  # unknown timm name, impossible geometry
        raise KernelError(f"model '{entry['name']}': cannot build {family} on '{entry['backbone']}': {exc}") from None
    model.name = entry["name"]
    model.entry = dict(entry)
    return model


def load_model(entry: dict, weights_dir: str | Path, device="cpu", verify: bool = True) -> nn.Module:
    """Build an entry's model, check its checkpoint's sha256 (when the manifest pins one), load it strictly
    and return it in eval mode on ``device``.

    What identifies the model: a pinned sha256 proves the file is the manifest entry's own. Without one only
    the architecture (every key and shape) can be checked, and another model's checkpoint of the same
    architecture would load: that is logged as a warning naming the model. Only a file whose pinned sha256
    matched may need full unpickling (:func:`read_checkpoint`), unless ``--trust-checkpoint`` allows every file."""
    path = Path(weights_dir) / entry["checkpoint"]
    if not path.is_file():
        raise CheckpointError(f"model '{entry['name']}': checkpoint {path} not found")
    pinned = bool(verify and entry.get("sha256"))
    if pinned:
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise CheckpointError(
                f"model '{entry['name']}': {path} has sha256 {digest[:16]}..., the manifest pins "
                f"{entry['sha256'][:16]}... (wrong or modified file)"
            )
    else:
        log.warning("model '%s': %s has no sha256 pinned in the manifest: only its architecture (keys and shapes) "
                    "was checked; another checkpoint of the same architecture would load as this model",
                    entry["name"], path)
    model = build_model(entry)
    load_weights(model, path, entry["name"], trusted=pinned)
    log.debug("loaded %s from %s", entry["name"], path)
    return model.eval().to(device)
