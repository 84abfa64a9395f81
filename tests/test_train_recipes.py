"""Recipes: complete for all nine ensemble members, consistent with the manifest and the hybrid geometry."""
import copy

import pytest

from kernel.errors import KernelError
from kernel.models import load_manifest
from kernel.models.demo import REPO_MANIFEST
from kernel.train.recipes import REQUIRED, RECIPES, STEP_DEFAULTS, get_recipe, resolve_step, validate_recipe

ENTRIES = load_manifest(REPO_MANIFEST)
NAMES = [e["name"] for e in ENTRIES]
SWIN_GRID = {"swin_base_patch4_window7_224": (224, 56), "swin_base_patch4_window12_384": (384, 96)}


def test_every_ensemble_member_has_a_recipe():
    assert len(NAMES) == 9
    for name in NAMES:
        assert RECIPES[name]["model"] == name
    assert {"retrieval2020_resnet152", "retrieval2020_resnest200"} <= set(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_step_is_complete(name):
    recipe = get_recipe(name)
    for k, raw in enumerate(recipe["steps"], 1):
        s = resolve_step(name, k, ENTRIES)
        for field in list(REQUIRED) + list(STEP_DEFAULTS):
            assert field in s, f"{name} step {k}: {field}"
        assert s["source"]
        arch = s["arch"]
        assert arch["image_size"] == s["image_size"] if "image_size" in s else True
        if k > 1:
            assert s["init"] != "imagenet" and 1 <= s["init"]["step"] < k
        if arch["family"] in ("dolg", "hybrid", "effnet"):
            assert arch["stem_stride"] in (1, 2)


@pytest.mark.parametrize("entry", ENTRIES, ids=NAMES)
def test_last_step_builds_the_manifest_model(entry):
    recipe = get_recipe(entry["name"])
    last = resolve_step(entry["name"], len(recipe["steps"]), ENTRIES)
    for field in ("family", "backbone", "image_size", "stem_stride", "dilations", "embedder", "feature_level"):
        assert last["arch"].get(field) == entry.get(field), field
    assert last["loss"]["type"] == "arcface" and last["loss"]["k"] == 3  # sub-center ArcFace heads


def test_dolg_schedule_follows_spec():
    for name in [n for n in NAMES if n.startswith("dolg")]:
        steps = [resolve_step(name, k, ENTRIES) for k in (1, 2, 3)]
        assert [s["data"] for s in steps] == ["gldv2c", "gldv2x", "gldv2x"]
        assert steps[0]["epochs"] == 10 and steps[0]["image_size"] == 256
        assert 30 <= steps[1]["epochs"] <= 40 and steps[1]["image_size"] == 448
        assert all(s["loss"]["margins"] == "dynamic" and s["loss"]["s"] == 45 for s in steps)
        assert all(s["optimizer"] == "adam" and 5e-5 <= s["lr"] <= 2.5e-4 for s in steps)
    b7 = resolve_step("dolg_effnet_b7_448_s1", 3, ENTRIES)
    assert b7["arch"]["stem_stride"] == 1 and b7["grad_accum"] == 4 and b7["lr"] == 5e-5


@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith("hybrid")])
def test_hybrid_steps_and_token_grid(name):
    n = len(get_recipe(name)["steps"])
    steps = [resolve_step(name, k, ENTRIES) for k in range(1, n + 1)]
    first = steps[0]
    default_size, grid = SWIN_GRID[first["arch"]["backbone"]]
    assert first["arch"]["family"] == "swin" and first["data"] == "gldv2c" and first["epochs"] == 10
    assert first["image_size"] == default_size
    second = steps[1]
    assert second["train_only"] == ["patch_embed"] and second["epochs"] == 1
    assert "patch_embed" in second["init"]["pop"]
    for s in steps[1:]:
        a = s["arch"]
        reduction = [2, 4, 8, 16, 32][a["feature_level"]] * a["stem_stride"] // 2
        assert a["image_size"] % reduction == 0 and a["image_size"] // reduction == grid, s["source"]
        assert s["clip_grad"]  # mixed precision overflows easily here
    assert steps[2]["train_only"] is None and steps[2]["data"] == "gldv2x"
    if name != "hybrid_b6_swin384_384":  # block insertion: one more embedder level, projection re-made
        assert steps[-1]["arch"]["feature_level"] == steps[-2]["arch"]["feature_level"] + 1
        assert steps[-1]["init"]["pop"] == ["patch_embed.proj.weight"]


def test_effnet_and_retrieval2020_recipes():
    b6 = [resolve_step("effnet_b6_512", k, ENTRIES) for k in (1, 2)]
    assert b6[0]["data"] == "gldv2" and b6[1]["data"] == "gldv2x" and b6[1]["stop_at"] == 28
    assert b6[1]["loss"]["s"] == 80 and "metric_classify" in b6[1]["init"]["pop"]
    r1, r2 = (resolve_step("retrieval2020_resnest200", k) for k in (1, 2))
    assert r1["loss"]["type"] == "softmax" and r1["data"] == "gldv2c" and r1["optimizer"] == "sgd"
    assert r2["loss"] == {"type": "arcface", "s": 30.0, "m": 0.3, "k": 1} and r2["cutmix"]
    assert r2["data"] == "gldv2_clustered" and r2["schedule"] == "poly" and r2["image_size"] == 448
    assert r2["arch"] == {"name": "retrieval2020_resnest200", "family": "retrieval2020", "backbone": "resnest200e",
                          "image_size": 448}


def test_validation_names_recipe_step_and_field():
    bad = copy.deepcopy(RECIPES["dolg_effnet_b5_768"])
    del bad["steps"][1]["lr"]
    with pytest.raises(KernelError, match="step 2: field 'lr' is missing"):
        validate_recipe("x", bad)
    bad = copy.deepcopy(RECIPES["dolg_effnet_b5_768"])
    bad["steps"][1]["init"] = {"step": 2}
    with pytest.raises(KernelError, match="step 2: field 'init'"):
        validate_recipe("x", bad)
    bad["steps"][1]["init"] = "random"
    validate_recipe("x", bad)
    bad = copy.deepcopy(RECIPES["dolg_effnet_b5_768"])
    bad["steps"][0]["colour"] = 1
    with pytest.raises(KernelError, match="'colour' is not a known step field"):
        validate_recipe("x", bad)
    with pytest.raises(KernelError, match="unknown recipe"):
        get_recipe("dolg_effnet_b9")
    with pytest.raises(KernelError, match="has steps 1..3"):
        resolve_step("dolg_effnet_b5_768", 4, ENTRIES)
    with pytest.raises(KernelError, match="override 'bogus'"):
        resolve_step("dolg_effnet_b5_768", 1, ENTRIES, {"bogus": 1})


def test_overrides_reach_step_and_architecture():
    s = resolve_step("hybrid_b3_swin224_896", 4, ENTRIES, {"image_size": 128, "batch_size": 2, "feature_level": 2})
    assert s["batch_size"] == 2 and s["arch"]["image_size"] == 128 and s["arch"]["feature_level"] == 2
