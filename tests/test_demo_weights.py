"""`python -m kernel demo-weights`: checkpoints in the original layouts that load through the normal path."""
import json
import subprocess
import sys

import pytest
import torch

from kernel.models import load_manifest, load_model, read_checkpoint, unwrap_state_dict
from tests.conftest import ROOT


def test_tiny_preset_is_complete_and_loads(tiny_weights):
    folder, manifest = tiny_weights
    entries = load_manifest(manifest)
    assert len(entries) == 9 and {e["family"] for e in entries} == {"dolg", "hybrid", "effnet"}
    for e in entries:
        assert e["sha256"] and (folder / e["checkpoint"]).is_file()
        sd = unwrap_state_dict(read_checkpoint(folder / e["checkpoint"]))
        head = "metric_classify.weight" if e["family"] == "effnet" else "head.weight"
        assert head in sd  # written with the training head, as the original code did
        if e["family"] == "hybrid":  # and with old timm's Swin layout and stored buffers
            assert "backbone.layers.0.downsample.reduction.weight" in sd
            assert any(k.endswith("relative_position_index") for k in sd)
        model = load_model(e, folder)
        s = e["image_size"]
        with torch.no_grad():
            out = model(torch.randn(2, 3, s, s))
        assert out.shape == (2, 512) and torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)


@pytest.mark.slow
def test_cli_is_deterministic(tmp_path):
    for d in ("a", "b"):
        subprocess.run([sys.executable, "-m", "kernel", "demo-weights", "--out", str(tmp_path / d),
                        "--preset", "tiny", "--models", "effnet_b6_512,hybrid_b6_swin384_384"],
                       cwd=ROOT, check=True, capture_output=True)
    a = json.loads((tmp_path / "a" / "weights_manifest.json").read_text())["models"]
    b = json.loads((tmp_path / "b" / "weights_manifest.json").read_text())["models"]
    assert [e["name"] for e in a] == ["hybrid_b6_swin384_384", "effnet_b6_512"]
    assert [e["sha256"] for e in a] == [e["sha256"] for e in b]


@pytest.mark.slow
def test_cli_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kernel", "demo-weights", "--out", str(tmp_path), "--models", "nope"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: unknown model 'nope'")
    assert "Traceback" not in r.stderr
