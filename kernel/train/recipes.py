"""Training recipes as data: one per model, one entry per step (docs/training.md).

A recipe names its architecture (``model``: a ``weights_manifest.json`` entry, or an inline ``arch`` for the
2020 retrieval family that the kernel does not ship) and lists its steps. A step holds every fact that
run needs; :data:`STEP_DEFAULTS` fills what a step does not say. Step fields:

==================  ========================================================================================
data                named data set (:data:`kernel.train.data.DATASETS`): gldv2 | gldv2c | gldv2x |
                    gldv2_clustered
image_size          training image side in pixels
stem_stride         EfficientNet stem stride (1 or 2) during this step
feature_level       hybrid only: the embedder's feature level fed to the Swin during this step
family              "swin" for the hybrid's first step (plain Swin, its own patch embedding)
epochs, stop_at     the cosine schedule spans ``epochs``; training stops after epoch ``stop_at`` (the original
                    configs' ``epochs=40, stop_at=29``); null = run all epochs
lr                  peak learning rate (after warm-up), for ``gpus`` x ``batch_size`` x ``grad_accum`` images
warmup_epochs       linear warm-up from ``warmup_start * lr`` to ``lr`` (``warmup_start``, default 0)
batch_size, gpus    images per GPU per step, and the GPU count the original run used (``fit`` warns, with the
                    learning-rate consequence, when it runs on another count)
grad_accum          gradient accumulation steps
optimizer           adam (Adam with L2 weight decay, as the originals) | adamw | sgd (momentum 0.9, Nesterov)
schedule            cosine | poly (power 0.9), both per iteration | cosine_2020 (the 2020 recognition code's
                    per-epoch warm-up x10 then cosine over ``epochs - 1``; see :func:`kernel.train.fit.lr_factor`)
weight_decay, clip_grad   L2 weight decay (default 0, the 2021 ``default_config.py``); max gradient norm
                    (null = no clipping, as every published config)
sync_bn             synchronised BatchNorm across GPUs (the 2020 code's apex ``convert_syncbn_model``)
loss                {"type": "arcface", "s", "margins": "dynamic", "a", "b"} | {"type": "arcface", "s", "m"}
                    | {"type": "softmax"}; ``k``: sub-centres of the ArcFace head
init                "imagenet" (timm ImageNet weights with ``--imagenet``, else random), "random", or
                    {"step": K, "pop": [name substrings not to load]}
train_only          name substrings of the only parameters that train (hybrid step 2: the new embedding)
cutmix              Corner-Cutmix dual-stream training (docs/training.md#the-2020-retrieval-seeds); ``cutmix_scale``: pasted side range
sampling_power      0: images drawn uniformly (the originals); p > 0: image weight n_class ** -p
source              where the numbers come from; "(our reading)" marks what no source states
==================  ========================================================================================

Sources (``docs/training.md`` has the table of every field with its source): the 2021 authors' configs
(ChristofHenkel/kaggle-landmark-2021-1st-place ``configs/cfg_ch_*.py``: DOLG-B7 steps 1-3, DOLG-B5/B6 step 3,
the three hybrids' last steps; ``default_config.py`` for what they leave unset), the 2020 3rd-place recognition
code (haqishen/Google-Landmark-Recognition-2020-3rd-Place-Solution ``train.py`` and its README's commands: the
pure EfficientNets) and the 2020 retrieval 3rd-place paper (Mei et al., arXiv 2008.10480).
"""
from __future__ import annotations

import copy

from kernel.errors import KernelError
from kernel.train.data import DATASETS

STEP_DEFAULTS = {
    "stop_at": None,
    "warmup_epochs": 1,
    "warmup_start": 0.0,
    "grad_accum": 1,
    "gpus": 8,
    "optimizer": "adam",
    "schedule": "cosine",
    "weight_decay": 0.0,
    "clip_grad": None,
    "sync_bn": False,
    "loss": {"type": "arcface", "s": 45.0, "margins": "dynamic", "a": 0.45, "b": 0.05, "k": 3},
    "train_only": None,
    "cutmix": False,
    "cutmix_scale": [0.3, 0.6],
    "sampling_power": 0.0,
}
REQUIRED = ("data", "image_size", "epochs", "lr", "batch_size", "init", "source")
KNOWN = set(STEP_DEFAULTS) | set(REQUIRED) | {"stem_stride", "feature_level", "family"}
SCHEDULES = ("cosine", "poly", "cosine_2020")

_EFF_TAGS = {"backbone": "ns_jft_in1k", "embedder": "ns_jft_in1k"}
_SWIN_TAGS = {"backbone": "ms_in22k_ft_in1k", "embedder": "ns_jft_in1k"}
_H21 = "ChristofHenkel/kaggle-landmark-2021-1st-place"
_H20 = "haqishen/Google-Landmark-Recognition-2020-3rd-Place-Solution"
# the 2020 recognition code (train.py): ArcFace s=80 with the same dynamic margins, Adam without weight decay,
# apex SyncBN, GradualWarmupSchedulerV2(multiplier 10, 1 epoch) then CosineAnnealingWarmRestarts(epochs - 1),
# stepped once per epoch: "cosine_2020" (kernel.train.fit.lr_factor). Peak lr = 10 x --init-lr.
_LOSS_2020 = {"type": "arcface", "s": 80.0, "margins": "dynamic", "a": 0.45, "b": 0.05, "k": 3}


def _y2020(init_lr: float = 1e-4) -> dict:
    """The 2020 schedule fields for a command with ``--init-lr init_lr`` (train.py's default 1e-4)."""
    return dict(loss=_LOSS_2020, weight_decay=0.0, lr=round(10 * init_lr, 12), warmup_start=0.1,
                schedule="cosine_2020", sync_bn=True)


def _dolg_step1(batch_size=64):
    return dict(data="gldv2c", image_size=256, stem_stride=2, epochs=10, lr=1e-4, batch_size=batch_size,
                weight_decay=1e-4, init="imagenet",
                source=f"{_H21} configs/cfg_ch_dolg_b7_step1.py (B5/B6 step 1 unpublished: our reading, B7's)")


def _dolg_step2(stop_at=29, source=f"{_H21} configs/cfg_ch_dolg_b7_step2.py"):
    return dict(data="gldv2x", image_size=448, stem_stride=2, epochs=40, stop_at=stop_at, lr=1e-4, batch_size=20,
                weight_decay=1e-4, init={"step": 1, "pop": []}, source=source)


def _hybrid_steps(swin_size, medium, level_medium):
    """Steps 1-2 of the hybrid schedule (docs/training.md#the-hybrids-four-training-steps) (configs unpublished: lr, batch, data of step 2 are our
    reading; weight decay 0 and no clipping as in every published hybrid config)."""
    return [
        dict(family="swin", data="gldv2c", image_size=swin_size, epochs=10, lr=1e-4, batch_size=32, init="imagenet",
             source="paper section 3, hybrid step 1: Swin-neck-head on small images, GLDv2c, 10 "
                    "epochs (lr, batch: our reading; weight decay 0 as the published hybrid configs)"),
        dict(data="gldv2x", image_size=medium, stem_stride=2, feature_level=level_medium, epochs=1, warmup_epochs=0,
             lr=1e-4, batch_size=16, train_only=["patch_embed"], init={"step": 1, "pop": ["patch_embed"]},
             source="paper, hybrid step 2: pretrained EfficientNet embedding swapped in, rest frozen, "
                    "one epoch at medium size (data, lr, batch: our reading)"),
    ]


def _effnet(gpus0, batch0, steps):
    """A 2020 3rd-place EfficientNet: train step 0 on full GLDv2 at 256 px, then its ``steps``
    ``(size, epochs, stop_at, batch, init_lr, source)`` on GLDv2x with 8 GPUs."""
    out = [dict(data="gldv2", image_size=256, epochs=10, batch_size=batch0, gpus=gpus0, init="imagenet",
                **_y2020(), source=f"{_H20} README.md, --train-step 0 command")]
    for k, (size, epochs, stop, batch, init_lr, src) in enumerate(steps, 2):
        pop = ["metric_classify"] if k == 2 else []  # train.py deletes the head when --train-step is 1
        out.append(dict(data="gldv2x", image_size=size, epochs=epochs, stop_at=stop, batch_size=batch, gpus=8,
                        init={"step": k - 1, "pop": pop}, **_y2020(init_lr), source=src))
    return out


RECIPES: dict[str, dict] = {
    # ---------------------------------------------------------------- DOLG-EfficientNet (2021)
    "dolg_effnet_b5_768": {
        "model": "dolg_effnet_b5_768", "pretrained_tags": _EFF_TAGS,
        "steps": [
            _dolg_step1(),
            _dolg_step2(source=f"{_H21} configs/cfg_ch_dolg_b7_step2.py (B5 step 2 unpublished: our reading)"),
            dict(data="gldv2x", image_size=768, stem_stride=2, epochs=7, lr=5e-5, batch_size=10,
                 init={"step": 2, "pop": []}, source=f"{_H21} configs/cfg_ch_dolg_b5_step3.py"),
        ],
    },
    "dolg_effnet_b6_768": {
        "model": "dolg_effnet_b6_768", "pretrained_tags": _EFF_TAGS,
        "steps": [
            _dolg_step1(),
            _dolg_step2(stop_at=25, source=f"{_H21} configs/cfg_ch_dolg_b6_step3.py starts from epoch 25 of run "
                                           "cfg_ch_dolg_5_s2x (unpublished); other numbers: cfg_ch_dolg_b7_step2.py"),
            dict(data="gldv2x", image_size=768, stem_stride=2, epochs=7, lr=1e-4, batch_size=10, weight_decay=1e-4,
                 init={"step": 2, "pop": []}, source=f"{_H21} configs/cfg_ch_dolg_b6_step3.py"),
        ],
    },
    "dolg_effnet_b7_448_s1": {
        "model": "dolg_effnet_b7_448_s1", "pretrained_tags": _EFF_TAGS,
        "steps": [
            _dolg_step1(),
            _dolg_step2(),
            dict(data="gldv2x", image_size=448, stem_stride=1, epochs=15, lr=5e-5, batch_size=4, grad_accum=4,
                 weight_decay=1e-4, init={"step": 2, "pop": []}, source=f"{_H21} configs/cfg_ch_dolg_b7_step3.py"),
        ],
    },
    # ---------------------------------------------------------------- Hybrid-Swin-Transformer (2021)
    "hybrid_b3_swin224_896": {
        "model": "hybrid_b3_swin224_896", "pretrained_tags": _SWIN_TAGS,
        "steps": _hybrid_steps(224, 448, 2) + [
            dict(data="gldv2x", image_size=448, stem_stride=2, feature_level=2, epochs=40, stop_at=30, lr=1e-4,
                 batch_size=16, init={"step": 2, "pop": []},
                 source="paper, hybrid step 3: unfrozen, 30-40 epochs GLDv2x (run "
                        "cfg_ch_hybrid_swin224_2x_b3_cutout_s2x, unpublished: numbers our reading)"),
            dict(data="gldv2x", image_size=896, stem_stride=2, feature_level=3, epochs=40, stop_at=16, lr=1e-4,
                 warmup_epochs=0, batch_size=12, init={"step": 3, "pop": ["patch_embed.proj.weight"]},
                 source=f"{_H21} configs/cfg_ch_hybrid_swin224_b3_3x_1.py (one more pretrained EfficientNet "
                        "block: feature level 2 -> 3)"),
        ],
    },
    "hybrid_b5_swin224_448_s1": {
        "model": "hybrid_b5_swin224_448_s1", "pretrained_tags": _SWIN_TAGS,
        "steps": _hybrid_steps(224, 448, 2) + [
            dict(data="gldv2x", image_size=448, stem_stride=2, feature_level=2, epochs=40, stop_at=30, lr=1e-4,
                 batch_size=16, init={"step": 2, "pop": []},
                 source="paper, hybrid step 3 (run cfg_ch_hybrid_swin224_2x_b5_cutout_s2x, "
                        "unpublished: numbers our reading)"),
            dict(data="gldv2x", image_size=448, stem_stride=1, feature_level=3, epochs=40, stop_at=16, lr=5e-5,
                 batch_size=8, init={"step": 3, "pop": ["patch_embed.proj.weight"]},
                 source=f"{_H21} configs/cfg_ch_hybrid_swin224_b5_s3x.py (one more block, level 2 -> 3, with stem "
                        "stride 1 keeps the 56x56 token grid at 448 px)"),
        ],
    },
    "hybrid_b6_swin384_384": {
        "model": "hybrid_b6_swin384_384", "pretrained_tags": _SWIN_TAGS,
        "steps": _hybrid_steps(384, 384, 1) + [
            dict(data="gldv2x", image_size=384, stem_stride=2, feature_level=1, epochs=40, stop_at=29, lr=2.5e-4,
                 batch_size=16, init={"step": 2, "pop": []},
                 source=f"{_H21} configs/cfg_ch_hybrid_swin384_b6_s1x_2.py (it starts from epoch 5 of run "
                        "cfg_ch_hybrid_swin384_b6_s1x, same architecture, unpublished: our reading, from step 2; "
                        "no block insertion)"),
        ],
    },
    # ---------------------------------------------------------------- pure EfficientNet (2020 3rd-place recipe)
    "effnet_b3_768": {
        "model": "effnet_b3_768", "pretrained_tags": _EFF_TAGS,
        "steps": _effnet(2, 128, [
            (544, 40, 29, 17, 1e-4, f"{_H20} README.md B3, --train-step 1 command"),
            (768, 5, None, 22, 5e-5, f"{_H20} README.md B3, --train-step 2 command"),
            (768, 5, None, 22, 5e-5, f"{_H20} README.md B3, --train-step 3 command"),
        ]),
    },
    "effnet_b6_512": {
        "model": "effnet_b6_512", "pretrained_tags": _EFF_TAGS,
        "steps": _effnet(4, 64, [
            (512, 40, 36, 22, 1e-4, f"{_H20} README.md, second B6 block (the run that ends at 512 px)"),
        ]),
    },
    "effnet_b5_704": {
        "model": "effnet_b5_704", "pretrained_tags": _EFF_TAGS,
        "steps": _effnet(4, 64, [
            (576, 40, 33, 24, 1e-4, f"{_H20} README.md, second B5 block (our reading: see docs/training.md, "
                                    "the 2021 paper credits this model to another team's procedure)"),
            (704, 5, 4, 13, 3e-5, f"{_H20} README.md, second B5 block's 768 px step, run at 704 px "
                                  "(our reading)"),
        ]),
    },
    # ---------------------------------------------------------------- 2020 retrieval 3rd place (docs/training.md#the-2020-retrieval-seeds)
    **{
        f"retrieval2020_{short}": {
            "arch": {"name": f"retrieval2020_{short}", "family": "retrieval2020", "backbone": backbone},
            "pretrained_tags": {"backbone": tag},
            "steps": [
                dict(data="gldv2c", image_size=448, epochs=e1, lr=0.01, batch_size=32, optimizer="sgd", weight_decay=1e-4,
                     schedule="poly", warmup_epochs=0, loss={"type": "softmax"}, init="imagenet",
                     source="Mei et al. 2020 (arXiv 2008.10480), training details: softmax pre-training on GLDv2c, "
                            "SGD lr 0.01 poly, 448 px (batch, weight decay: our reading)"),
                dict(data="gldv2_clustered", image_size=448, epochs=e2, lr=0.01, batch_size=32, optimizer="sgd", weight_decay=1e-4,
                     schedule="poly", warmup_epochs=0, loss={"type": "arcface", "s": 30.0, "m": 0.3, "k": 1},
                     cutmix=True, init={"step": 1, "pop": ["head."]},
                     source="Mei et al. 2020 (arXiv 2008.10480), training details: ArcFace m=0.3 s=30 on the "
                            "DBSCAN-cleaned data with Corner-Cutmix (batch, weight decay: our reading)"),
            ],
        }
        for short, backbone, tag, e1, e2 in (("resnet152", "resnet152", "tv_in1k", 24, 12),
                                             ("resnest200", "resnest200e", "in1k", 12, 6))
    },
}


def validate_recipe(name: str, recipe: dict) -> None:
    """Check a recipe's steps; raises :class:`KernelError` naming recipe, step and field."""
    if ("model" in recipe) == ("arch" in recipe):
        raise KernelError(f"recipe '{name}': give exactly one of 'model' (manifest entry) or 'arch'")
    steps = recipe.get("steps")
    if not isinstance(steps, list) or not steps:
        raise KernelError(f"recipe '{name}': 'steps' must be a non-empty list")
    for i, raw in enumerate(steps, 1):
        where = f"recipe '{name}' step {i}"
        for f in REQUIRED:
            if f not in raw:
                raise KernelError(f"{where}: field '{f}' is missing")
        unknown = sorted(set(raw) - KNOWN)
        if unknown:
            raise KernelError(f"{where}: field '{unknown[0]}' is not a known step field")
        s = {**STEP_DEFAULTS, **raw}
        if s["data"] not in DATASETS:
            raise KernelError(f"{where}: field 'data' must be one of {', '.join(DATASETS)} (got {s['data']!r})")
        for f in ("image_size", "epochs", "batch_size", "grad_accum", "gpus"):
            if not isinstance(s[f], int) or s[f] < 1:
                raise KernelError(f"{where}: field '{f}' must be a positive integer (got {s[f]!r})")
        if s["stop_at"] is not None and not 1 <= s["stop_at"] <= s["epochs"]:
            raise KernelError(f"{where}: field 'stop_at' must lie in 1..epochs (got {s['stop_at']})")
        if not (isinstance(s["lr"], float) and s["lr"] > 0):
            raise KernelError(f"{where}: field 'lr' must be a positive float (got {s['lr']!r})")
        if s["optimizer"] not in ("adam", "adamw", "sgd") or s["schedule"] not in SCHEDULES:
            raise KernelError(f"{where}: unknown optimizer/schedule {s['optimizer']!r}/{s['schedule']!r}")
        if s.get("stem_stride", 2) not in (1, 2):
            raise KernelError(f"{where}: field 'stem_stride' must be 1 or 2")
        loss = s["loss"]
        if loss.get("type") not in ("arcface", "softmax") or (
            loss["type"] == "arcface" and loss.get("margins") != "dynamic" and "m" not in loss
        ):
            raise KernelError(f"{where}: field 'loss' must be arcface (dynamic margins or 'm') or softmax")
        init = s["init"]
        if init not in ("imagenet", "random"):
            if not isinstance(init, dict) or not isinstance(init.get("step"), int) or not 1 <= init["step"] < i:
                raise KernelError(f"{where}: field 'init' must be \"imagenet\", \"random\" or "
                                  f"{{'step': K < {i}, 'pop': [...]}}")
        if s.get("family") not in (None, "swin"):
            raise KernelError(f"{where}: field 'family' may only be 'swin' (the hybrid's first step)")


def get_recipe(name: str) -> dict:
    if name not in RECIPES:
        raise KernelError(f"unknown recipe '{name}' (known: {', '.join(sorted(RECIPES))})")
    recipe = copy.deepcopy(RECIPES[name])
    validate_recipe(name, recipe)
    return recipe


def resolve_step(name: str, step: int, entries: list[dict] | None = None, overrides: dict | None = None) -> dict:
    """Everything step ``step`` (1-based) of recipe ``name`` needs: the step fields with defaults and
    ``overrides`` applied, plus ``arch``, the architecture to build (a manifest entry with this step's image
    size, stem stride and feature level, or the recipe's inline ``arch``). ``entries``: manifest entries
    (default: the repository's ``weights_manifest.json``)."""
    recipe = get_recipe(name)
    steps = recipe["steps"]
    if not 1 <= step <= len(steps):
        raise KernelError(f"recipe '{name}' has steps 1..{len(steps)}, not {step}")
    s = {**copy.deepcopy(STEP_DEFAULTS), **steps[step - 1]}
    arch_keys = {"image_size", "stem_stride", "feature_level", "family"}
    for k, v in (overrides or {}).items():
        if k not in KNOWN and k not in ("backbone_args", "embedder_args"):
            raise KernelError(f"override '{k}': not a step field (known: {', '.join(sorted(KNOWN))})")
        s[k] = v
    if overrides:  # re-check the step with the overrides applied
        check = copy.deepcopy(recipe)
        check["steps"][step - 1] = {**steps[step - 1], **{k: v for k, v in overrides.items() if k in KNOWN}}
        validate_recipe(f"{name} (with --set)", check)
    if "arch" in recipe:
        arch = dict(recipe["arch"])
    else:
        if entries is None:
            from kernel.models import load_manifest
            from kernel.demo.weights import REPO_MANIFEST

            entries = load_manifest(REPO_MANIFEST)
        match = [e for e in entries if e["name"] == recipe["model"]]
        if not match:
            raise KernelError(f"recipe '{name}': model '{recipe['model']}' is not in the manifest")
        arch = copy.deepcopy(match[0])
    for k in arch_keys & set(s):
        arch[k] = s[k]
    for k in ("backbone_args", "embedder_args"):
        if k in s:
            arch[k] = s.pop(k)
    if arch.get("family") == "swin":
        arch["swin_image_size"] = arch["image_size"]
    s["pretrained_tags"] = recipe.get("pretrained_tags", {})
    s["arch"] = arch
    s["recipe"], s["step"], s["n_steps"] = name, step, len(steps)
    return s
