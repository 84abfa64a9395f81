"""Training on a CUDA GPU, the training modules' main path: a tiny ``fit`` step in AMP fp16 (grad scaler) and
bf16 finishes and resumes; the smoke run learns on the GPU as it does on the CPU in fp32 (held-out mAP@100
and GAP rise, the loss falls); one process under ``torchrun``
goes through the process group with NCCL (DDP, the NaN guard's all-reduce, the sharded validation's
all-gather, the epoch barrier). Skipped, with the reason, where no CUDA GPU is visible."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from kernel.models import build_model, load_manifest, load_weights
from kernel.train.cli import main
from kernel.train.smoke import make_views, run_smoke

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 3


@pytest.fixture(scope="module")
def views(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu_views")
    make_views(d, views=6, view_size=40, seed=3)
    return d


def _args(data, out, manifest, *extra):
    return ["fit", "--recipe", "effnet_b6_512", "--step", "1", "--data", str(data), "--images", str(data),
            "--out", str(out), "--manifest", str(manifest), "--workers", "0", "--val-fraction", "0.25",
            "--random-init", "--seed", "0", "--set", "image_size=32", "--set", "batch_size=8",
            "--set", "stop_at=null", *extra]


def _history(out):
    return [json.loads(line) for line in (out / "step1" / "history.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def cpu_smoke():
    """The quick smoke run on the CPU in fp32: the learning a GPU run must show too."""
    return run_smoke(quick=True, progress=False, device="cpu", precision="fp32")


@pytest.mark.timeout(150)
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_smoke_learns_on_cuda_as_on_the_cpu(precision, cpu_smoke):
    gpu = run_smoke(quick=True, progress=False, device="cuda", precision=precision)
    print(json.dumps({"precision": precision, "cuda": gpu, "cpu": cpu_smoke}))
    assert gpu["device"] == "cuda"
    for res in (cpu_smoke, gpu):  # the criteria of tests/test_train_smoke.py, on both devices
        fam = res["families"]["effnet"]
        assert res["map_after"] > res["map_before"] + 0.1, res
        assert fam["gap_after"] > fam["gap_before"] + 0.2 and fam["train_loss_last"] < fam["train_loss_first"], res
    # same data, same initial weights: the GPU's held-out retrieval after training is the CPU's, give or take
    # what mixed precision and the GPU's own random streams (dropout, drop-path) change
    assert gpu["map_after"] == pytest.approx(cpu_smoke["map_after"], abs=0.2), (gpu, cpu_smoke)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_fit_on_cuda_finishes_and_resumes(precision, views, tiny_weights, tmp_path):
    manifest = tiny_weights[1]
    out = tmp_path / precision
    # two of three epochs, then --resume continues from last.pth (optimizer, schedule and grad-scaler state)
    assert main(_args(views, out, manifest, "--device", "cuda", "--precision", precision,
                      "--set", f"epochs={EPOCHS}", "--set", f"stop_at={EPOCHS - 1}")) == 0
    last = torch.load(out / "step1" / "last.pth", map_location="cpu", weights_only=True)
    assert last["epoch"] == EPOCHS - 1
    assert ("scale" in last["scaler"]) == (precision == "fp16")  # the grad scaler runs in fp16 only
    assert main(_args(views, out, manifest, "--device", "cuda", "--precision", precision, "--resume",
                      "--set", f"epochs={EPOCHS}")) == 0
    hist = _history(out)
    print(json.dumps({"precision": precision, "history": hist}))
    assert [h["epoch"] for h in hist] == list(range(1, EPOCHS + 1))
    for h in hist:
        assert math.isfinite(h["train_loss"]) and h["skipped_steps"] == 0 and h["train_images_per_s"] > 0
    # the checkpoint a GPU wrote loads into the kernel on the CPU
    entry = next(e for e in load_manifest(manifest) if e["name"] == "effnet_b6_512")
    model = load_weights(build_model(dict(entry, image_size=32)), out / "step1" / "model.pth").eval()
    emb = model(torch.randn(2, 3, 32, 32))
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)


@pytest.mark.timeout(150)
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_nccl_available(),
                    reason="this torch has no NCCL")
def test_one_process_under_torchrun_trains_through_nccl(views, tiny_weights, tmp_path):
    out = tmp_path / "torchrun"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "kernel.train", "-v", *_args(views, out, tiny_weights[1], "--precision", "bf16",
                                              "--set", "epochs=2")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=140)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "process group: nccl backend, rank 0 of 1 on cuda:0" in log, log[-4000:]
    hist = _history(out)
    assert [h["epoch"] for h in hist] == [1, 2] and hist[-1]["n_val"] > 0
    rec = torch.load(out / "step1" / "model.pth", map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in rec["model"])  # DDP's wrapper is not in the checkpoint
