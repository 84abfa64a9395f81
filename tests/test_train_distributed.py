"""Validation sharded over two CPU ranks (gloo, torch.multiprocessing spawn) scores exactly what one rank
scores: every rank embeds its shard, the shards are gathered in order, rank 0 computes GAP and mAP@100."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from kernel.models import load_manifest
from kernel.train.recipes import resolve_step
from kernel.train.smoke import make_views

pytestmark = pytest.mark.slow  # end-to-end: subprocesses, whole runs (the fast loop skips them)

OVERRIDES = {"image_size": 32, "batch_size": 4, "init": "random"}


def _run(rank: int, world: int, port: int, data: str, manifest: str, out: str) -> None:
    """One rank: build the step, validate (every rank), rank 0 writes the metrics and embeddings."""
    import pandas as pd

    from kernel.train.fit import StepRun
    from kernel.train.validation import embed_sharded

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    df = pd.read_csv(os.path.join(data, "train.csv"), dtype={"id": str})
    val = df.iloc[::3].reset_index(drop=True)  # 18 of 52 images: shards of 9 and 9 on two ranks
    val = val.iloc[:-1]  # 17: uneven shards (9 + 8) exercise the padding
    step = resolve_step("effnet_b6_512", 1, load_manifest(manifest), OVERRIDES)
    run = StepRun(step, df, val, data, os.path.join(out, f"w{world}"), workers=0, progress=False, device="cpu",
                  seed=0)
    metrics = run.validate()
    emb, preds = embed_sharded(run.net, run.val_ds, run.env, 4, 0)
    if rank == 0:
        torch.save({"metrics": metrics, "emb": torch.from_numpy(emb), "preds": torch.from_numpy(preds)},
                   os.path.join(out, f"world{world}.pt"))
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_sharded_validation_on_two_ranks_equals_one_rank(tiny_weights, tmp_path):
    _, manifest = tiny_weights
    data = tmp_path / "data"
    make_views(data, views=4, view_size=40, seed=2)
    _run(0, 1, 0, str(data), str(manifest), str(tmp_path))  # one process, no process group
    mp.spawn(_run, args=(2, _free_port(), str(data), str(manifest), str(tmp_path)), nprocs=2, join=True)
    one = torch.load(tmp_path / "world1.pt", weights_only=True)
    two = torch.load(tmp_path / "world2.pt", weights_only=True)
    assert one["emb"].shape == two["emb"].shape == (17, 512)
    assert torch.allclose(one["emb"], two["emb"], atol=1e-5)  # same images in the same order
    assert torch.equal(one["preds"][:, 0], two["preds"][:, 0])
    m1, m2 = one["metrics"], two["metrics"]
    assert m1["n_val"] == m2["n_val"] == 17 and m1["n_queries"] == m2["n_queries"] > 0
    assert m1["gap"] == pytest.approx(m2["gap"], abs=1e-9), json.dumps([m1, m2])
    assert m1["map100"] == pytest.approx(m2["map100"], abs=1e-9), json.dumps([m1, m2])


def test_one_process_under_torchrun_trains_through_the_process_group(tiny_weights, tmp_path):
    """torchrun starts the process group for one process too (gloo here; tests/test_train_gpu.py: NCCL), so the
    multi-GPU path (DDP, the NaN guard's all-reduce, the sharded validation, the barrier) runs on one device."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    data, out = tmp_path / "data", tmp_path / "run"
    make_views(data, views=3, view_size=40, seed=4)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "kernel.train", "-v", "fit", "--recipe", "effnet_b6_512", "--step", "1", "--data", str(data),
           "--images", str(data), "--out", str(out), "--manifest", str(tiny_weights[1]), "--workers", "0",
           "--val-fraction", "0.3", "--random-init", "--device", "cpu", "--set", "image_size=32",
           "--set", "batch_size=4", "--set", "epochs=1", "--set", "stop_at=null"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "process group: gloo backend, rank 0 of 1 on cpu" in log, log[-3000:]
    rec = torch.load(out / "step1" / "model.pth", map_location="cpu", weights_only=True)
    assert rec["epoch"] == 1 and not any(k.startswith("module.") for k in rec["model"])
