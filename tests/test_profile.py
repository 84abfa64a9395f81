"""`profile`: every model measured and projected, a plan, JSON and PNG."""
import time
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from kernel.budget import plan_models
from tests.conftest import ROOT


@pytest.mark.slow
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
        assert m["measured_ms"] > 0 and m["gflop"] > 0 and m["batch_size"] >= 1
        assert m["t4x2_ms"] > m["p100_ms"] > 0  # one T4 is slower than a P100 by the bandwidth rule
    for card in ("t4x2", "p100"):
        for track in ("recognition", "retrieval"):
            plan = data["targets"][card]["plans"][track]
            assert plan["fits"] and len(plan["kept"]) == 8 and plan["dropped"] == [] and plan["target"] == card
    assert "keep:" in r.stdout and "t4x2 ms" in r.stdout and "p100 ms" in r.stdout
    assert Image.open(png).size[0] > 100


def test_full_manifest_projection_matches_spec_flops():
    """Backbone FLOPs of docs/kaggle.md#the-scale-of-the-work are a lower bound of our whole-model counts (heads add the rest)."""
    from kernel.budget import count_gflops
    from kernel.demo.weights import preset_entries

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


def _profile(*args):
    from kernel.cli import main

    return main(["profile", "--no-measure", "--models", "dolg_effnet_b5_768,hybrid_b6_swin384_384", *args])


@pytest.mark.slow
def test_each_card_has_its_plan_and_the_json_lists_both(tmp_path, capsys):
    from kernel import budget

    js = tmp_path / "p.json"
    assert _profile("--target", "t4x2", "--json", str(js), "--budget-hours", "1.08", "--reserve-hours", "0",
                    "--n-test", "10000", "--n-index", "76176") == 0
    out = capsys.readouterr().out
    assert "retrieval: planned for 10,000 test images and 76,176 index images extracted in the notebook as given" in out
    assert "t4x2 recognition:" in out and "p100 recognition:" not in out and "2 x 65.0 TFLOPS" in out
    data = json.loads(js.read_text())
    t4, p100 = data["targets"]["t4x2"], data["targets"]["p100"]
    assert (t4["machine_shape"], t4["devices"], t4["mem_gbs"]) == ("NvidiaTeslaT4", 2, 320.0)
    assert (p100["machine_shape"], p100["devices"], p100["mem_gbs"]) == ("NvidiaTeslaP100", 1, 732.0)
    # the bandwidth rule: one T4 reaches P100 throughput x 320/732; two T4s share the images
    m = data["models"][0]
    assert abs(m["t4x2_ms"] / m["p100_ms"] - 732 / 320) < 1e-3
    plan = t4["plans"]["retrieval"]
    assert abs(m["t4x2_retrieval_hours"] - 86_176 * m["t4x2_ms"] / 2 / 1000 / 3600) < 1e-3
    # 1.08 h: both models fit on the P100 for retrieval, not on the T4 x2 (1.14x slower): the plan says which
    assert p100["plans"]["retrieval"]["fits"] and len(p100["plans"]["retrieval"]["kept"]) == 2
    assert plan["kept"] == ["dolg_effnet_b5_768"] and plan["dropped"] == ["hybrid_b6_swin384_384"]
    assert _profile("--target", "p100") == 0
    out = capsys.readouterr().out
    assert "p100 recognition:" in out and "t4x2 recognition:" not in out
    # a measured efficiency replaces the assumption: for one card, or for the P100 basis of every card
    assert budget.target_efficiency(budget.T4X2, {"t4x2:effnet": 0.05})["effnet"] == 0.05
    assert budget.target_efficiency(budget.P100, {"t4x2:effnet": 0.05})["effnet"] == 0.20
    assert budget.target_efficiency(budget.T4X2, {"effnet": 0.4})["effnet"] == 2 * budget.target_efficiency(
        budget.T4X2)["effnet"]


def test_the_plan_is_for_the_hidden_sets_and_says_what_the_public_folders_hold(tmp_path, capsys):
    from kernel import sizes

    js = tmp_path / "p.json"
    assert _profile("--target", "t4x2", "--json", str(js)) == 0
    out = capsys.readouterr().out
    factor = sizes.HIDDEN_FACTOR
    assert factor >= 2 and sizes.hidden_counts("recognition")["test"] >= 20_000  # at least twice the public 10,000
    assert out.splitlines()[0] == (f"recognition: planned for the scored rerun's {10_000 * factor:,} test images "
                                   f"(public test/: 10,000); our reading: hidden sets {factor}x the public ones "
                                   "(kernel/sizes.py)")
    assert (f"retrieval: planned for the scored rerun's {1_129 * factor:,} test images (public test/: 1,129) and "
            f"{76_176 * (factor - 1):,} index images extracted in the notebook") in out.splitlines()[1]
    data = json.loads(js.read_text())
    assert data["counts"]["recognition"] == {"test": 10_000 * factor, "index": 0, "train": 0}
    assert data["counts"]["retrieval"]["index"] == 76_176 * (factor - 1)
    assert data["public"]["recognition"] == {"test": 10_000, "train_rows": 1_580_470}
    plan = data["targets"]["t4x2"]["plans"]["retrieval"]
    assert plan["images"] == 1_129 * factor + 76_176 * (factor - 1) and plan["fits"] and plan["dropped"] == []


def test_which_run_tells_the_public_folder_from_the_scored_rerun():
    from kernel.sizes import PUBLIC, which_run

    public = PUBLIC["recognition"]
    assert which_run("recognition", dict(public), public) == (
        "this run: the public recognition folder (test 10000, train_rows 1580470: the public sizes)")
    line = which_run("recognition", {"test": 20_000, "train_rows": 1_580_470}, public)
    assert line == "this run: the scored rerun, not the public recognition folder: test 20000 (public 10000)"
    assert "cannot tell" in which_run("retrieval", {"test": 1_129, "index": None}, PUBLIC["retrieval"])


def test_bad_efficiency_is_one_clear_error(capsys):
    for bad in ("effnet=x", "k80:effnet=0.1", "swin=0.2", "effnet=3"):
        assert _profile("--efficiency", bad) == 2
        assert f"--efficiency {bad}" in capsys.readouterr().err


def test_plot_is_a_matplotlib_png_of_the_expected_size(tmp_path):
    from kernel import profile

    rows = [{"name": "dolg_effnet_b5_768", "gflop": 55.0, "t4x2_recognition_hours": 0.8, "t4x2_retrieval_hours": 2.1},
            {"name": "effnet_b3_768", "gflop": 22.6, "t4x2_recognition_hours": 0.4, "t4x2_retrieval_hours": None},
            {"name": "effnet_b5_704", "gflop": 30.0, "t4x2_recognition_hours": None, "t4x2_retrieval_hours": 1.2}]
    plans = [{"track": t, "target": "t4x2", "projected_hours": h, "budget_hours": 12.0, "kept": ["a", "b"],
              "dropped": []} for t, h in (("recognition", 1.7), ("retrieval", 3.8))]
    png = tmp_path / "plots" / "p.png"
    profile.plot(rows, plans, png, "Projected t4x2 hours per model (test)")
    width, height = profile.plot_size(3, 2)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (round(width * profile.PLOT_DPI), round(height * profile.PLOT_DPI))
        colours = {c for _, c in im.convert("RGB").getcolors(1 << 20)}
    assert (0x34, 0x65, 0xA4) in colours and (0xCC, 0x66, 0x00) in colours  # a bar of each track
    source = Path(profile.__file__).read_text()
    assert "ImageDraw" not in source and "from PIL" not in source  # drawn with matplotlib, not PIL


def test_gpu_timing_warms_up_for_a_while_cpu_once(monkeypatch):
    # an idle GPU clocks down: the H200's first profiled model measured 3x slow after a single warm-up forward
    import torch

    from kernel import profile

    calls = []
    model = lambda x: calls.append(1)  # noqa: E731
    profile._warm_up(model, None, torch.device("cpu"))
    assert len(calls) == 1
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: time.sleep(0.01))
    monkeypatch.setattr(profile, "WARM_SECONDS", 0.1)
    calls.clear()
    t0 = time.perf_counter()
    profile._warm_up(model, None, torch.device("cuda"))
    assert time.perf_counter() - t0 >= 0.1 and len(calls) >= 5
