"""Extraction over several devices: two CPU worker processes stand in for two GPUs
($KERNEL_EXTRACT_DEVICES=cpu,cpu). Same store bit for bit as one process, resume after a kill mid-way, the
deadline honoured, a failed worker's share done by the final pass, and the device list itself."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import kernel.extract as kx
from kernel import multidevice as md
from kernel import store as kstore
from kernel.data.sources import folder_source
from kernel.errors import KernelError
from kernel.models import load_manifest, select

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = sorted((ROOT / "kernel" / "sample_data" / "gldv2").glob("*.jpg"))
TWO = ["dolg_effnet_b7_448_s1", "hybrid_b6_swin384_384"]  # two families, two input sizes


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Twelve photos (the bundled ones, repeated under other names) and one broken file."""
    d = tmp_path_factory.mktemp("images")
    for k in range(12):
        (d / f"img{k:02d}.jpg").write_bytes(SAMPLES[k % len(SAMPLES)].read_bytes())
    (d / "zz_broken.jpg").write_text("<html>not found</html>")
    return d


@pytest.fixture(scope="module")
def entries(tiny_weights):
    return select(load_manifest(tiny_weights[1]), ",".join(TWO))


@pytest.fixture(scope="module")
def reference(entries, tiny_weights, images, tmp_path_factory):
    """One process, one device: the store every multi-device run must reproduce."""
    store = tmp_path_factory.mktemp("ref")
    s = _run(entries, tiny_weights, images, store, device="cpu")
    assert s.complete and s.device == "cpu"
    return store


def _run(entries, tiny_weights, images, store, **kw):
    kw = {"workers": 0, "batch_size": 1, "dtype": "float32", "progress": False, **kw}
    return kx.extract(entries, tiny_weights[0], folder_source(images), "test", store, **kw)


def _store_files(store: Path) -> dict:
    """Every file of a store: descriptor arrays (bytes), meta.json and failure files (text)."""
    out = {}
    for p in sorted(store.rglob("*")):
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                out[str(p.relative_to(store))] = {k: z[k].tobytes() + str(z[k].dtype).encode() for k in z}
        elif p.is_file():
            out[str(p.relative_to(store))] = p.read_text()
    return out


def test_devices_of_each_setting(monkeypatch):
    monkeypatch.delenv(md.ENV_DEVICES, raising=False)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert md.extract_devices(None) == ([torch.device("cuda", i) for i in range(gpus)] or [torch.device("cpu")])
    assert md.extract_devices("cpu") == [torch.device("cpu")]
    monkeypatch.setenv(md.ENV_DEVICES, "cpu, cpu")
    assert md.extract_devices(None) == [torch.device("cpu")] * 2
    assert md.extract_devices("cpu") == [torch.device("cpu")]  # an explicit --device wins
    monkeypatch.setenv(md.ENV_DEVICES, "cpu,gpu7")
    with pytest.raises(KernelError, match=md.ENV_DEVICES):
        md.extract_devices(None)
    # too few images to be worth two processes: one device does it
    assert not md.worth_sharing([torch.device("cpu")] * 2, 15, 2) and md.worth_sharing([torch.device("cpu")] * 2, 16, 2)
    assert not md.worth_sharing([torch.device("cpu")], 1000, 2)
    assert md.worker_decoders(0, 2, "cuda") == 0 and md.worker_decoders(8, 2, "cuda") == 4
    assert md.worker_decoders(1, 2, "cuda") == 1


def test_two_workers_give_the_one_process_store(entries, tiny_weights, images, reference, tmp_path, monkeypatch):
    monkeypatch.setenv(md.ENV_DEVICES, "cpu,cpu")
    seen = []
    s = _run(entries, tiny_weights, images, tmp_path / "two", on_batch=seen.append)
    assert s.complete and not s.stopped and s.device == "cpu,cpu"
    assert s.computed == {n: 12 for n in TWO} and s.failures.keys() == {"zz_broken"} and s.new_failures == 1
    assert seen and seen[-1].done == 13 and seen[-1].total == 13  # the workers' progress reaches the caller
    assert set(seen[-1].model_seconds) == set(TWO) and all(v > 0 for v in seen[-1].model_seconds.values())
    assert _store_files(tmp_path / "two") == _store_files(reference)  # shards merged, worker files gone
    again = _run(entries, tiny_weights, images, tmp_path / "two")  # a completed split is not recomputed
    assert again.complete and sum(again.computed.values()) == 0 and again.device == "cpu"


def _stop_after_one_batch():
    """worker_init of the deadline test: the clock passes the deadline once a worker finished a batch."""
    def stop_reason(self):
        return "deadline" if self.batches >= 1 else ""

    kx._Run.stop_reason = stop_reason


def test_deadline_stops_every_worker_and_resumes(entries, tiny_weights, images, reference, tmp_path, monkeypatch):
    monkeypatch.setenv(md.ENV_DEVICES, "cpu,cpu")
    st = tmp_path / "s"
    past = _run(entries, tiny_weights, images, st, deadline=time.monotonic() - 1)
    assert past.stopped == "deadline" and not past.complete and sum(past.computed.values()) == 0
    s = _run(entries, tiny_weights, images, st, deadline=time.monotonic() + 3600, worker_init=_stop_after_one_batch)
    # each worker stopped after its first batch (one image), kept it, and nothing was merged
    assert s.stopped == "deadline" and not s.complete and s.computed == {n: 2 for n in TWO}
    assert not any(kstore.has_split(st, n, "test") for n in TWO)
    assert all(len(kstore.read_parts(st, n, "test")[0]) == 2 for n in TWO)
    done = _run(entries, tiny_weights, images, st)
    assert done.complete and done.present == {n: 2 for n in TWO} and done.computed == {n: 10 for n in TWO}
    assert _store_files(st) == _store_files(reference)


def _fail_on_second_worker():
    """worker_init: the worker on the second device loses its 'GPU' at its first batch."""
    import multiprocessing

    if multiprocessing.current_process().name.endswith("-1"):
        def broken(*a, **k):
            raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")

        kx._run_group = broken


def test_a_failed_worker_leaves_its_share_to_the_final_pass(entries, tiny_weights, images, reference, tmp_path,
                                                             monkeypatch, caplog):
    monkeypatch.setenv(md.ENV_DEVICES, "cpu,cpu")
    s = _run(entries, tiny_weights, images, tmp_path / "s", worker_init=_fail_on_second_worker)
    assert s.complete and s.computed == {n: 12 for n in TWO}
    assert "illegal memory access" in caplog.text
    assert _store_files(tmp_path / "s") == _store_files(reference)


def test_sigkill_mid_way_then_resume(entries, tiny_weights, images, reference, tmp_path):
    weights, manifest = tiny_weights
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "kernel", "extract", "--manifest", str(manifest), "--weights", str(weights),
           "--images", str(images), "--split", "test", "--models", ",".join(TWO), "--batch-size", "1",
           "--workers", "0", "--flush-images", "1", "--dtype", "float32", "--no-progress", "--store", str(killed)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", md.ENV_DEVICES: "cpu,cpu"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    part = kstore.parts_dir(killed, TWO[0], "test")
    t0 = time.monotonic()
    try:  # both workers have written a shard: kill the whole process group (as Kaggle ends a session)
        while not (part.is_dir() and {p.name[5] for p in part.glob("part-*.npz")} >= {"0", "1"}):
            assert proc.poll() is None, "the extraction ended before it could be killed"
            assert time.monotonic() - t0 < 120
            time.sleep(0.002)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not any(kstore.has_split(killed, n, "test") for n in TWO)
    env_ok = {**env}
    rc = subprocess.run(cmd, cwd=ROOT, env=env_ok, capture_output=True, text=True)
    assert rc.returncode == 0, rc.stderr[-2000:]
    assert "complete" in rc.stdout
    assert _store_files(killed) == _store_files(reference)


def test_predict_uses_every_device_and_writes_the_same_submission(tiny_weights, tmp_path, monkeypatch):
    from kernel.predict import predict
    from kernel.sample_competition import make_competition, sample_photos

    comp = make_competition(tmp_path / "comp", seed=3, photos=sample_photos()[:5])
    weights, manifest = tiny_weights
    kw = dict(models=TWO[0], progress=False, workers=0, batch_size=1)
    one = predict("recognition", comp.recognition, manifest, weights, tmp_path / "one" / "s.csv", device="cpu", **kw)
    monkeypatch.setenv(md.ENV_DEVICES, "cpu,cpu")
    two = predict("recognition", comp.recognition, manifest, weights, tmp_path / "two" / "s.csv", **kw)
    assert (tmp_path / "two" / "s.csv").read_text() == (tmp_path / "one" / "s.csv").read_text()
    assert two.predicted == one.predicted > 0 and not two.dropped
    assert any("on cpu,cpu" in d for d in two.decisions), two.decisions  # the train split: both workers
