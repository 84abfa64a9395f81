"""The original checkpoint layouts load strictly, and reproduce the original code's descriptors."""
import json

import pytest
import torch
import torch.nn.functional as F

from kernel.models import build_model, load_weights
from kernel.demo.weights import deterministic_state_dict, preset_entries
from tests.conftest import FIXTURES

LAYOUTS = FIXTURES / "layouts"
ENTRIES = {e["name"]: e for e in preset_entries("full")}
NAMES = sorted(ENTRIES)
WITH_EMBEDDING = [n for n in NAMES if "embedding" in json.loads((LAYOUTS / f"{n}.json").read_text())]


def _reference(name):
    return json.loads((LAYOUTS / f"{name}.json").read_text())


def test_fixtures_cover_the_nine_models():
    assert len(NAMES) == 9
    assert sorted(p.stem for p in LAYOUTS.glob("*.json")) == NAMES
    assert WITH_EMBEDDING == ["dolg_effnet_b5_768", "effnet_b3_768", "hybrid_b3_swin224_896"]


@pytest.mark.parametrize("name", NAMES)
def test_layout_loads_strictly(name):
    ref = _reference(name)
    model = build_model(ENTRIES[name])
    sd = deterministic_state_dict(ref["layout"])
    # the way real checkpoints arrive: wrapped and DataParallel-prefixed
    load_weights(model, {"model": {f"module.{k}": v for k, v in sd.items()}}, name)
    own = model.state_dict()
    for key, value in sd.items():
        if key in own and "num_batches_tracked" not in key and ".downsample." not in key:  # moved: see below
            assert torch.equal(own[key], value), key
    # derived buffers were recomputed, not taken from the file (the fixture fills them with -7 / 0)
    for key, buf in model.named_buffers():
        if key.endswith("relative_position_index"):
            assert buf.max() > 0
        if key.endswith("attn_mask") and buf is not None:
            assert (buf != -7).all()


@pytest.mark.parametrize("name", WITH_EMBEDDING)
def test_reproduces_original_descriptor(name):
    ref = _reference(name)
    model = build_model(ENTRIES[name])
    load_weights(model, deterministic_state_dict(ref["layout"]), name)
    model.eval()
    s = ref["input_size"]
    x = torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(1234))
    with torch.no_grad():
        out = model(x)[0]
    cos = F.cosine_similarity(out, torch.tensor(ref["embedding"]), dim=0).item()
    assert cos >= 0.9999, f"{name}: cosine {cos:.6f} to the original code's descriptor"
    assert abs(out.norm().item() - 1) < 1e-5


def test_old_swin_layout_is_remapped_not_ignored():
    """Patch merging stored at the end of stage i must land at the start of stage i+1."""
    name = "hybrid_b3_swin224_896"
    ref = _reference(name)
    sd = deterministic_state_dict(ref["layout"])
    model = load_weights(build_model(ENTRIES[name]), sd, name)
    own = model.state_dict()
    assert torch.equal(own["backbone.layers.1.downsample.reduction.weight"], sd["backbone.layers.0.downsample.reduction.weight"])
    assert torch.equal(own["backbone.layers.3.downsample.norm.bias"], sd["backbone.layers.2.downsample.norm.bias"])
