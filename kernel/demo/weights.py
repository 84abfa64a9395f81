"""Demo weights: seeded random checkpoints in the original training code's layout, plus their manifest.

Real weights cannot be downloaded here or on Kaggle, so tests, the dry-run and ``build_kernel.py`` use these.
Every tensor follows from its key and shape alone (the rule of the layout fixtures, see
``tests/fixtures/layouts/README.md``), so two runs write identical files.

Presets:
- ``full``: the nine real architectures (several GB; for GPU machines);
- ``tiny``: the same nine names, families and code paths (DOLG fusion, hybrid embedding + Swin with old-timm
  stage-end patch merging and stored buffers, pure EfficientNet) on tiny timm backbones and 64-128 px images,
  so a CPU run of the whole pipeline takes seconds.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from pathlib import Path

import torch

from kernel.errors import KernelError
from kernel.models import swin_layout

log = logging.getLogger(__name__)

HELP = "write seeded random checkpoints in the original layouts plus their weights_manifest.json"

REPO_MANIFEST = Path(__file__).resolve().parents[2] / "weights_manifest.json"
DEMO_CLASSES = 7  # training-head size of the demo checkpoints (real ones: 81,313)
SUBCENTERS = 3

_TINY_SWIN = dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4, img_size=64)
# name -> overrides that make the tiny preset (same families and code paths, tiny backbones)
TINY = {
    "dolg_effnet_b5_768": dict(backbone="test_efficientnet", image_size=64, dilations=[1, 2, 3]),
    "dolg_effnet_b6_768": dict(backbone="test_efficientnet", image_size=64, dilations=[1, 2, 2]),
    "dolg_effnet_b7_448_s1": dict(backbone="test_efficientnet", image_size=32, dilations=[1, 1, 2]),
    "hybrid_b3_swin224_896": dict(embedder="test_efficientnet", feature_level=2, image_size=128),
    "hybrid_b5_swin224_448_s1": dict(embedder="test_efficientnet", feature_level=2, image_size=64),
    "hybrid_b6_swin384_384": dict(embedder="test_efficientnet", feature_level=1, image_size=64),
    "effnet_b3_768": dict(backbone="test_efficientnet", image_size=64),
    "effnet_b5_704": dict(backbone="test_efficientnet", image_size=96),
    "effnet_b6_512": dict(backbone="test_efficientnet", image_size=64),
}


def deterministic_tensor(key: str, shape, dtype=torch.float32) -> torch.Tensor:
    """The layout fixtures' deterministic-weights rule: a tensor from its key and shape alone."""
    shape = list(shape)
    if key.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.int64)
    if not dtype.is_floating_point:
        return torch.zeros(shape, dtype=dtype)
    g = torch.Generator().manual_seed(int(hashlib.sha256(key.encode()).hexdigest()[:12], 16))
    r = torch.randn(shape, generator=g)
    if "relative_position_index" in key or "attn_mask" in key:
        t = torch.full(shape, -7.0)  # deliberately wrong: such buffers must be recomputed, never loaded
    elif key.endswith("running_var"):
        t = torch.rand(shape, generator=g) * 0.5 + 0.75
    elif key.endswith("running_mean"):
        t = 0.1 * r
    elif key.endswith(".p"):
        t = 3.0 + 0.1 * r
    elif shape == [1]:
        t = 0.25 + 0.01 * r
    elif key.endswith("bias"):
        t = 0.02 * r
    elif len(shape) == 1:
        t = 1.0 + 0.1 * r
    elif "relative_position_bias_table" in key:
        t = 0.02 * r
    else:
        t = r / math.sqrt(math.prod(shape[1:]))
    return t.to(dtype)


def deterministic_state_dict(layout) -> dict:
    """``layout`` = iterable of ``(key, shape, dtype-name)``, as in the layout fixtures."""
    return {k: deterministic_tensor(k, s, getattr(torch, t)) for k, s, t in layout}


def original_layout(model, n_classes: int = DEMO_CLASSES) -> list[tuple[str, list[int], str]]:
    """The state-dict layout the original training code would save for this model: our keys, plus the
    training head, plus (hybrid) the unused GeM exponent and old timm's Swin layout with its stored buffers."""
    entries = []
    for k, v in model.state_dict().items():
        if model.family == "hybrid":
            k = swin_layout.new_to_old(k)
        entries.append((k, list(v.shape), str(v.dtype).replace("torch.", "")))
    if model.family == "hybrid":
        for k, b in model.named_buffers():
            if k.endswith("relative_position_index") or k.endswith("attn_mask"):
                entries.append((k, list(b.shape), str(b.dtype).replace("torch.", "")))
        entries.append(("global_pool.p", [1], "float32"))
    head = f"{model.head_key}.weight"
    entries.append((head, [n_classes * SUBCENTERS, model.neck[0].out_features if hasattr(model, "neck")
                           else model.feat.out_features], "float32"))
    return entries


def preset_entries(preset: str, manifest: str | Path = REPO_MANIFEST) -> list[dict]:
    from kernel.models.manifest import load_manifest

    entries = copy.deepcopy(load_manifest(manifest))
    if preset == "full":
        return entries
    if preset != "tiny":
        raise KernelError(f"unknown preset '{preset}' (choose full or tiny)")
    for e in entries:
        e.update(TINY[e["name"]])
        if e["family"] == "hybrid":
            e["backbone_args"] = dict(_TINY_SWIN)
        if e["family"] == "dolg":
            e["local_dim"], e["atrous_dim"] = 64, 32
    return entries


def write_demo_weights(out: str | Path, preset: str = "tiny", models=None, pin_hashes: bool = True) -> Path:
    """Write ``<out>/<checkpoint>`` for every (selected) entry and ``<out>/weights_manifest.json``.

    Returns the manifest path. With ``pin_hashes`` the manifest carries each checkpoint's sha256.
    """
    from kernel.models import build_model, sha256_file
    from kernel.models.manifest import select

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries = select(preset_entries(preset), models)
    for e in entries:
        model = build_model(e)
        sd = deterministic_state_dict(original_layout(model))
        path = out / e["checkpoint"]
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"model": sd, "epoch": 0}, tmp)
        tmp.replace(path)
        e["sha256"] = sha256_file(path) if pin_hashes else None
        log.info("wrote %s (%s, %.1f MB)", path, e["family"], path.stat().st_size / 1e6)
    manifest = out / "weights_manifest.json"
    tmp = manifest.with_name(manifest.name + ".tmp")
    tmp.write_text(json.dumps({"models": entries}, indent=2))
    tmp.replace(manifest)
    return manifest


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, help="folder for the checkpoints and weights_manifest.json")
    p.add_argument("--preset", choices=["tiny", "full"], default="tiny",
                   help="tiny: small backbones for CPU tests (default); full: the nine real architectures")
    p.add_argument("--models", default=None, help="comma-separated subset of model names")


def run(args) -> int:
    from kernel.cli import claim_dir

    # new, empty, or an earlier demo-weights folder: a folder of real checkpoints is never written into
    claim_dir(args.out, ".kernel-demo-weights.json")
    manifest = write_demo_weights(args.out, args.preset, args.models)
    n = len(json.loads(manifest.read_text())["models"])
    print(f"wrote {n} {args.preset} demo checkpoints and {manifest}")
    return 0
