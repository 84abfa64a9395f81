"""`profile`: every model measured and projected, a plan, JSON and PNG."""
import json
import subprocess
import sys

from PIL import Image

from kernel.budget import plan_models
from tests.conftest import ROOT


def test_profile_json_has_every_model_and_a_plan(tiny_weights, tmp_path):
    weights, manifest = tiny_weights
    js, png = tmp_path / "p.json", tmp_path / "p.png"
    r = subprocess.run([sys.executable, "-m", "kernel", "profile", "--manifest", str(manifest), "--weights",
                        str(weights), "--device", "cpu", "--json", str(js), "--plot", str(png), "--n-test", "1000"],
                       cwd=ROOT, capture_output=True, text=True, check=True)
    data = json.loads(js.read_text())
    names = [m["name"] for m in data["models"]]
    assert len(names) == 9
    for m in data["models"]:
        assert m["measured_ms"] > 0 and m["gflop"] > 0 and m["p100_ms"] > 0 and m["batch_size"] >= 1
    for track in ("recognition", "retrieval"):
        plan = data["plans"][track]
        assert plan["fits"] and len(plan["kept"]) == 8 and plan["dropped"] == []
    assert "keep:" in r.stdout and "P100 ms" in r.stdout
    assert Image.open(png).size[0] > 100


def test_full_manifest_projection_matches_spec_flops():
    """Backbone FLOPs of SPEC §6 are a lower bound of our whole-model counts (heads add the rest)."""
    from kernel.budget import count_gflops
    from kernel.models.demo import preset_entries

    by = {e["name"]: e for e in preset_entries("full")}
    assert abs(count_gflops(by["effnet_b3_768"]) - 22.6) < 0.3  # pure EfficientNet: backbone + tiny FC
    assert count_gflops(by["dolg_effnet_b5_768"]) > 55.2


def test_plan_drops_by_priority_and_keeps_one():
    costs = {"a": 10.0, "b": 10.0, "c": 10.0}
    prio = {"a": 1, "b": 3, "c": 2}
    plan = plan_models(costs, prio, budget_s=25, fixed_s=0)
    assert plan.kept == ["a", "c"] and plan.dropped == ["b"] and plan.fits
    plan = plan_models(costs, prio, budget_s=1, fixed_s=0)
    assert plan.kept == ["a"] and not plan.fits and len(plan.decisions) == 3
