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
from kernel.extract import loop
from kernel.data.sources import folder_source
from kernel.demo import SAMPLE_DIR
from kernel.errors import KernelError
from kernel.models import load_manifest, select

pytestmark = pytest.mark.slow  # end-to-end: subprocesses, whole runs (the fast loop skips them)

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = sorted(SAMPLE_DIR.glob("*.jpg"))
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


class _Close:
    """A float array that equals another of the same dtype and shape within float32 rounding: a worker with
    another thread count or batch composition sums the same products in another order (the last bits of a
    hybrid's attention differ on some CPUs and on GPUs); ids and every text file must still match exactly."""

    def __init__(self, a: np.ndarray):
        self.a = a

    def __eq__(self, other):
        return (isinstance(other, _Close) and self.a.dtype == other.a.dtype and self.a.shape == other.a.shape
                and np.allclose(self.a, other.a, rtol=0, atol=1e-5))

    def __repr__(self):
        return f"_Close({self.a.dtype}, {self.a.shape})"


def _store_files(store: Path) -> dict:
    """Every file of a store: ids (bytes), descriptor arrays (within rounding), meta.json and failure files."""
    out = {}
    for p in sorted(store.rglob("*")):
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                out[str(p.relative_to(store))] = {
                    k: _Close(z[k]) if z[k].dtype.kind == "f" else z[k].tobytes() + str(z[k].dtype).encode()
                    for k in z}
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
    for bad in ("cpu,gpu7", ","):
        monkeypatch.setenv(md.ENV_DEVICES, bad)
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

    loop._Run.stop_reason = stop_reason


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
    done = _run(entries, tiny_weights, images, st, device="cpu")  # resumable on any number of devices
    assert done.complete and done.present == {n: 2 for n in TWO} and done.computed == {n: 10 for n in TWO}
    assert _store_files(st) == _store_files(reference)


def _fail_on_second_worker():
    """worker_init: the worker on the second device loses its 'GPU' at its first batch."""
    import multiprocessing

    if multiprocessing.current_process().name.endswith("-1"):
        def broken(*a, **k):
            raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")

        loop._run_group = broken


def test_a_failed_worker_leaves_its_share_to_the_final_pass(entries, tiny_weights, images, reference, tmp_path,
                                                             monkeypatch, caplog):
    monkeypatch.setenv(md.ENV_DEVICES, "cpu,cpu")
    s = _run(entries, tiny_weights, images, tmp_path / "s", worker_init=_fail_on_second_worker)
    assert s.complete and s.computed == {n: 12 for n in TWO}
    assert "illegal memory access" in caplog.text
    assert _store_files(tmp_path / "s") == _store_files(reference)


def _extract_cmd(tiny_weights, images, store, models) -> list[str]:
    weights, manifest = tiny_weights
    return [sys.executable, "-m", "kernel", "extract", "--manifest", str(manifest), "--weights", str(weights),
            "--images", str(images), "--split", "test", "--models", ",".join(models), "--batch-size", "1",
            "--workers", "0", "--flush-images", "1", "--dtype", "float32", "--no-progress", "--store", str(store)]


def _start(cmd, marker: str):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", md.ENV_DEVICES: "cpu,cpu", marker: "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _wait_for_both_workers(proc, part: Path) -> None:
    """Until each worker (part numbers 0... and 1000000...) has written a shard."""
    t0 = time.monotonic()
    while not (part.is_dir() and {p.name[5] for p in part.glob("part-*.npz")} >= {"0", "1"}):
        assert proc.poll() is None, "the extraction ended before it could be killed"
        assert time.monotonic() - t0 < 120
        time.sleep(0.002)


def test_sigkill_mid_way_then_resume(tiny_weights, images, reference, tmp_path, monkeypatch):
    """The whole run is killed (as Kaggle ends a session); a new run finishes it with the reference's result."""
    killed = tmp_path / "killed"
    proc = _start(_extract_cmd(tiny_weights, images, killed, TWO), f"KERNEL_TEST_{os.getpid()}_group")
    try:
        _wait_for_both_workers(proc, kstore.parts_dir(killed, TWO[0], "test"))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not any(kstore.has_split(killed, n, "test") for n in TWO)
    assert len(kstore.read_parts(killed, TWO[0], "test")[0]) > 0
    monkeypatch.setenv(md.ENV_DEVICES, "cpu,cpu")
    manifest = tiny_weights[1]
    s = _run(select(load_manifest(manifest), ",".join(TWO)), tiny_weights, images, killed)  # two workers again
    assert s.complete and 0 < sum(s.present.values())
    assert _store_files(killed) == _store_files(reference)


def _processes_with(marker: str) -> list[int]:
    """Pids of the processes whose environment holds ``marker`` (the run, its fork server, its workers)."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and marker.encode() in (d / "environ").read_bytes():
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


@pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="needs /proc to find the workers")
def test_workers_stop_when_their_parent_is_killed(tiny_weights, tmp_path):
    """Only the main process is killed: its workers stop after their batch instead of extracting on alone."""
    from PIL import Image

    many = tmp_path / "many"
    many.mkdir()
    Image.open(SAMPLES[0]).convert("RGB").resize((48, 48)).save(many / "p000.jpg")
    for k in range(1, 600):  # seconds of work per worker, against milliseconds for a worker to stop
        (many / f"p{k:03d}.jpg").write_bytes((many / "p000.jpg").read_bytes())
    store, marker = tmp_path / "s", f"KERNEL_TEST_{os.getpid()}_parent"
    proc = _start(_extract_cmd(tiny_weights, many, store, TWO[:1]), marker)
    t0 = time.monotonic()
    try:
        _wait_for_both_workers(proc, kstore.parts_dir(store, TWO[0], "test"))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        while _processes_with(marker):
            assert time.monotonic() - t0 < 120, "worker processes outlived their killed parent"
            time.sleep(0.05)
    finally:
        if _processes_with(marker):
            os.killpg(proc.pid, signal.SIGKILL)
    assert 0 < len(kstore.read_parts(store, TWO[0], "test")[0]) < 300  # both stopped well before their end


def test_predict_uses_every_device_and_writes_the_same_submission(tiny_weights, tmp_path, monkeypatch):
    from kernel.demo.competition import make_competition, sample_photos
    from kernel.predict import PredictOptions, predict

    comp = make_competition(tmp_path / "comp", seed=3, photos=sample_photos()[:5])
    weights, manifest = tiny_weights
    # batch 1: a split of 8 or more images goes over the two workers; the probe (10) leaves 6 test images
    kw = dict(models=TWO[0], progress=False, workers=0, batch_size=1, probe_images=10)
    one = predict(PredictOptions("recognition", comp.recognition, manifest, weights, tmp_path / "one" / "s.csv",
                                 device="cpu", **kw))
    monkeypatch.setenv(md.ENV_DEVICES, "cpu,cpu")
    two = predict(PredictOptions("recognition", comp.recognition, manifest, weights, tmp_path / "two" / "s.csv", **kw))
    assert (tmp_path / "two" / "s.csv").read_text() == (tmp_path / "one" / "s.csv").read_text()
    assert two.predicted == one.predicted > 0 and not two.dropped
    assert any("on cpu,cpu" in d for d in two.decisions), two.decisions  # the train split (15): both workers
