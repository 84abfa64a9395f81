"""The networks a recipe step trains: a descriptor model plus its training head.

- The nine ensemble members come from the model zoo (:func:`kernel.models.build_model`). The training head is
  attached to the zoo model under the original key, the model class's ``head_key`` (``head`` for dolg/hybrid,
  ``metric_classify`` for the pure EfficientNets; weight ``(n_classes * k, 512)``), so ``net.state_dict()``
  *is* the original training layout and :func:`kernel.models.load_weights` reads a trained checkpoint back
  (it drops heads).
- :class:`SwinNeck`: the hybrid's first step, a plain Swin (its own patch embedding) with the FC-BN-PReLU neck;
  its keys are the hybrid's (``backbone.*``, ``neck.*``), so the next step inherits everything but the patch
  embedding.
- :class:`Retrieval2020Net`: the 2020 retrieval 3rd-place model (docs/training.md#the-2020-retrieval-seeds): ResNet152 / ResNeSt200, global
  average pooling, 1x1 conv to 512, BatchNorm, L2.

:class:`Trainee` wraps a net for training (and DDP): ``forward(x) -> (descriptors, logits)``.
"""
from __future__ import annotations

import logging

import timm
import torch
import torch.nn.functional as F
from torch import nn

from kernel.errors import KernelError
from kernel.models import build_model
from kernel.models.layers import make_neck
from kernel.train.losses import SoftmaxHead, SubcenterArcMargin

log = logging.getLogger(__name__)

class SwinNeck(nn.Module):
    """Step 1 of the hybrid recipe: Swin with its own patch embedding, pooled tokens, FC-BN-PReLU neck."""

    family = "swin"
    head_key = "head"  # the hybrid's, so step 2 can inherit it

    def __init__(self, backbone: str, embedding_dim: int = 512, image_size: int | None = None,
                 backbone_args: dict | None = None):
        super().__init__()
        args = dict(backbone_args or {})
        if image_size is not None:
            args["img_size"] = image_size
        self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0, **args)
        self.neck = make_neck(self.backbone.num_features, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.backbone.forward_features(x)  # (B, H, W, C)
        return F.normalize(self.neck(x.mean(dim=(1, 2))), dim=1)


class Retrieval2020Net(nn.Module):
    """ResNet / ResNeSt (timm), global average pooling, 1x1 conv to ``embedding_dim``, BatchNorm, L2."""

    family = "retrieval2020"
    head_key = "head"

    def __init__(self, backbone: str = "resnet152", embedding_dim: int = 512, backbone_args: dict | None = None):
        super().__init__()
        self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0, global_pool="",
                                          **(backbone_args or {}))
        self.fc = nn.Conv2d(self.backbone.num_features, embedding_dim, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.backbone.forward_features(x).mean(dim=(2, 3), keepdim=True)
        return F.normalize(self.bn(self.fc(x)).flatten(1), dim=1)


def embedding_dim(net: nn.Module) -> int:
    if hasattr(net, "neck"):
        return net.neck[0].out_features
    if hasattr(net, "feat"):
        return net.feat.out_features
    return net.fc.out_channels


def build_net(arch: dict) -> nn.Module:
    """Descriptor model of a resolved step architecture (``arch["family"]`` picks the builder)."""
    family = arch["family"]
    try:
        if family == "swin":
            net = SwinNeck(arch["backbone"], image_size=arch.get("swin_image_size"),
                           backbone_args=arch.get("backbone_args"))
        elif family == "retrieval2020":
            net = Retrieval2020Net(arch["backbone"], backbone_args=arch.get("backbone_args"))
        else:
            return build_model(arch)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise KernelError(f"model '{arch.get('name')}': cannot build {family} on '{arch['backbone']}': {exc}") from None
    net.name = arch.get("name", family)
    return net


def attach_head(net: nn.Module, n_classes: int, kind: str = "arcface", k: int = 3) -> nn.Module:
    """Register the training head on ``net`` under its original key; returns ``net``."""
    key = net.head_key
    dim = embedding_dim(net)
    head = SoftmaxHead(dim, n_classes) if kind == "softmax" else SubcenterArcMargin(dim, n_classes, k)
    net.add_module(key, head)
    return net


def get_head(net: nn.Module) -> nn.Module:
    return getattr(net, net.head_key)


class Trainee(nn.Module):
    """``forward(x) -> (descriptors, logits)``: one module for DDP that runs the net and its head."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor):
        emb = self.net(x)
        return emb, get_head(self.net)(emb)


def freeze(net: nn.Module, train_only=None) -> int:
    """With ``train_only`` (name substrings), only parameters whose name holds one of them train (hybrid step 2:
    ``["patch_embed"]``). Returns the number of trainable parameters."""
    if train_only:
        for name, p in net.named_parameters():
            p.requires_grad = any(s in name for s in train_only)
    n = sum(p.numel() for p in net.parameters() if p.requires_grad)
    if n == 0:
        raise KernelError(f"train_only={train_only} leaves no parameter to train")
    return n


# timm sub-modules that ImageNet weights go into: family -> [(attribute path, role)]
_PRETRAINED_PARTS = {
    "dolg": [("backbone", "backbone")],
    "effnet": [("enet", "backbone")],
    "swin": [("backbone", "backbone")],
    "hybrid": [("backbone", "backbone"), ("backbone.patch_embed.backbone", "embedder")],
    "retrieval2020": [("backbone", "backbone")],
}


# parts of a pretrained timm model that are *not* pretrained in the net (made new by the architecture): the
# hybrid's 1x1 projection from the embedder's feature map to the Swin width
_NEVER_PRETRAINED = {"hybrid": ("backbone.patch_embed.proj.",)}


def pretrained_tensors(net: nn.Module) -> list[str]:
    """State-dict names that should hold pretrained weights: everything under the family's pretrained parts
    (:data:`_PRETRAINED_PARTS`) except what the architecture makes new. A recipe step must get each of them
    from the previous step's checkpoint or from ImageNet (``--imagenet``), or be told ``--random-init``."""
    parts = [path + "." for path, _ in _PRETRAINED_PARTS[net.family]]
    never = _NEVER_PRETRAINED.get(net.family, ())
    return [k for k in net.state_dict() if any(k.startswith(p) for p in parts) and not k.startswith(never)
            and not k.endswith("num_batches_tracked")]


def describe_missing(names: list[str], limit: int = 4) -> str:
    """``"38 tensors (38 under backbone.patch_embed.backbone), e.g. ..."``: grouped by their first three
    name components, largest groups first."""
    groups: dict[str, list[str]] = {}
    for n in names:
        parts = n.split(".")
        groups.setdefault(".".join(parts[:min(len(parts) - 1, 3)]), []).append(n)
    top = sorted(groups.items(), key=lambda kv: -len(kv[1]))
    shown = "; ".join(f"{len(v)} under {k}" for k, v in top[:limit])
    more = f"; {len(top) - limit} more groups" if len(top) > limit else ""
    return f"{len(names)} tensors ({shown}{more}), e.g. {', '.join(names[:3])}"


def load_imagenet(net: nn.Module, arch: dict, tags: dict | None = None) -> list:
    """Copy timm's ImageNet weights (``pretrained=True``: timm's own cache/hub, e.g.
    ``tf_efficientnet_b5.ns_jft_in1k``) into the backbone parts, matching by name and shape. Training only;
    the kernel never calls this. Returns ``(path, TransferReport)`` per part."""
    from kernel.train.checkpoint import transfer

    report = []
    for path, role in _PRETRAINED_PARTS[net.family]:
        name = arch[role]
        tag = (tags or {}).get(role)
        full = f"{name}.{tag}" if tag else name
        module = net.get_submodule(path)
        try:
            src = timm.create_model(full, pretrained=True, num_classes=0)
        except Exception as exc:  # no network / not cached / unknown tag
            raise KernelError(f"cannot get ImageNet weights '{full}' for {path} ({type(exc).__name__}: {exc}); "
                              "make timm's cache hold them, or pass --random-init to train from random "
                              "weights") from None
        report.append((path, transfer(module, src.state_dict(), min_fraction=0.3, what=f"ImageNet {full} -> {path}")))
    return report
