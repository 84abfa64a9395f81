"""Key layouts of the published checkpoints: old timm <-> current timm Swin keys (kernel.models.swin_layout) and
the training-head prefixes, on the real key lists of tests/fixtures/layouts."""
import json

import pytest

from kernel.models import build_model, load_weights
from kernel.demo.weights import deterministic_state_dict, original_layout, preset_entries
from kernel.models.swin_layout import is_old_layout, new_to_old, old_to_new
from tests.conftest import FIXTURES

HYBRIDS = sorted(p.stem for p in (FIXTURES / "layouts").glob("hybrid_*.json"))


def _old_keys(name):
    return [k for k, _, _ in json.loads((FIXTURES / "layouts" / f"{name}.json").read_text())["layout"]]


def test_the_documented_example():
    old, new = "backbone.layers.0.downsample.reduction.weight", "backbone.layers.1.downsample.reduction.weight"
    assert old_to_new(old) == new and new_to_old(new) == old
    for key in ("backbone.layers.0.blocks.1.attn.qkv.weight", "backbone.patch_embed.backbone.blocks.2.0.conv_pw.weight",
                "neck.0.weight", "head.weight"):
        assert old_to_new(key) == key == new_to_old(key)


@pytest.mark.parametrize("name", HYBRIDS)
def test_round_trip_is_the_identity_on_a_published_hybrid(name):
    old = _old_keys(name)
    new = [old_to_new(k) for k in old]
    assert [new_to_old(k) for k in new] == old
    assert len(set(new)) == len(old)  # no two keys land on one
    moved = [(o, n) for o, n in zip(old, new) if o != n]
    assert moved and all(".downsample." in o for o, _ in moved)
    # old timm: stages 0-2 end with a merging, the last stage has none; current timm: stages 1-3 start with one
    stages = lambda keys: sorted({k.split(".")[2] for k in keys if ".downsample." in k})  # noqa: E731
    assert stages(old) == ["0", "1", "2"] and stages(new) == ["1", "2", "3"]
    assert is_old_layout(old) and not is_old_layout(new)


def test_a_hybrid_checkpoint_in_either_layout_loads():
    """The published (old) layout is moved on loading; a state dict already in current timm's layout is kept."""
    entry = next(e for e in preset_entries("tiny") if e["family"] == "hybrid")
    model = build_model(entry)
    old = deterministic_state_dict(original_layout(model))
    load_weights(model, old)
    reduction = model.backbone.layers[1].downsample.reduction.weight
    assert reduction.equal(old["backbone.layers.0.downsample.reduction.weight"])
    current = {k: v.clone() for k, v in model.state_dict().items()}
    current["backbone.layers.1.downsample.reduction.weight"].mul_(2)
    load_weights(model, current)
    assert reduction.equal(2 * old["backbone.layers.0.downsample.reduction.weight"])


@pytest.mark.parametrize("name", sorted(p.stem for p in (FIXTURES / "layouts").glob("*.json")))
def test_head_prefixes_are_the_published_training_heads(name):
    """What the loader drops and the bundle strips (HEAD_PREFIXES) is exactly each published file's head."""
    from kernel.models import DOLG, EffNet, Hybrid
    from kernel.models.checkpoint import HEAD_PREFIXES

    family = next(e["family"] for e in preset_entries("full") if e["name"] == name)
    model_class = {c.family: c for c in (DOLG, Hybrid, EffNet)}[family]
    heads = [k for k in _old_keys(name) if k.startswith(HEAD_PREFIXES)]
    assert heads == [f"{model_class.head_key}.weight"]
