"""Extraction into the descriptor store, with the real tiny-preset models: one pass equals each model
alone, broken images are reported and skipped, interrupted runs (deadline, crash, SIGKILL) resume to the
same result, shards merge, completed splits are not recomputed."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import kernel.extract as kx
import kernel.extract.planning
from kernel import store as kstore
from kernel.cli import main
from kernel.data.sources import folder_source
from kernel.demo import SAMPLE_DIR
from kernel.errors import KernelError
from kernel.models import load_manifest, select

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = sorted(SAMPLE_DIR.glob("*.jpg"))
THREE = ["dolg_effnet_b7_448_s1", "hybrid_b6_swin384_384", "effnet_b5_704"]  # one per family, sizes 32/64/96
BROKEN = {"broken_empty": "empty file", "broken_text": "not an image", "broken_trunc": "truncated"}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: the tiny models gain nothing from two, and on a shared 2-core machine two
    OpenMP threads spin-wait for each other (measured here: 8 s instead of 0.4 s for one extract call)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four bundled photos plus every odd kind of image, and three broken files."""
    d = tmp_path_factory.mktemp("images")
    for p in SAMPLES[:4]:
        shutil.copy(p, d / p.name)
    photo = Image.open(SAMPLES[0]).convert("RGB")
    photo.save(d / "odd_png_as.jpg", "PNG")
    photo.convert("L").save(d / "odd_gray.jpg", "JPEG")
    photo.convert("CMYK").save(d / "odd_cmyk.jpg", "JPEG")
    photo.convert("RGBA").save(d / "odd_rgba.png", "PNG")
    Image.fromarray((np.asarray(photo.convert("L"), np.uint16) * 257)).save(d / "odd_16bit.png", "PNG")
    exif = photo.getexif()
    exif[0x0112] = 8
    photo.save(d / "odd_exif.jpg", "JPEG", exif=exif.tobytes())
    (d / "broken_empty.jpg").write_bytes(b"")
    (d / "broken_text.jpg").write_text("<html>not found</html>")
    data = (SAMPLES[1]).read_bytes()
    (d / "broken_trunc.jpg").write_bytes(data[: len(data) // 3])
    return d


@pytest.fixture(scope="module")
def entries(tiny_weights):
    return load_manifest(tiny_weights[1])


def _run(entries, tiny_weights, records, store, names=None, **kw):
    kw.setdefault("workers", 0)
    kw.setdefault("batch_size", 4)
    kw.setdefault("dtype", "float32")
    kw.setdefault("progress", False)
    return kx.extract(select(entries, names), tiny_weights[0], records, "test", store, **kw)


def _load(store, names):
    return {n: kstore.load_split(store, n, "test") for n in names}


# On a GPU the extraction runs in float16 autocast and cuDNN picks its kernels per batch shape: descriptors differ
# from a float32 CPU forward, and between batch compositions, by about 1e-4 (an H200 showed up to 1.1e-4 on these
# unit vectors). On a CPU the extraction is float32 and only the summation order differs.
ROUNDING_ATOL = 5e-4 if torch.cuda.is_available() else 1e-6
REFERENCE_ATOL = 5e-4 if torch.cuda.is_available() else 1e-5


def _assert_same(a: dict, b: dict, atol: float = 0.0):
    """Same ids, same descriptors (bit for bit unless ``atol``)."""
    assert a.keys() == b.keys()
    for n in a:
        np.testing.assert_array_equal(a[n][0], b[n][0], err_msg=n)
        np.testing.assert_allclose(a[n][1], b[n][1], rtol=0, atol=atol, err_msg=n)


@pytest.mark.slow
def test_one_pass_equals_each_model_alone(entries, tiny_weights, images, tmp_path):
    # all nine models (every family and code path) on a photo, a broken file and the odd kinds
    checked = (SAMPLES[0].stem, "odd_exif", "odd_png_as", "odd_gray", "odd_rgba", "odd_16bit")
    records = [r for r in folder_source(images) if r.id in checked or r.id == "broken_text"]
    names = [e["name"] for e in entries]
    s = _run(entries, tiny_weights, records, tmp_path / "one")
    assert s.complete and not s.stopped and set(s.computed.values()) == {len(records) - 1}
    together = _load(tmp_path / "one", names)
    for n in names:
        _run(entries, tiny_weights, records, tmp_path / n, [n])
    alone = {n: _load(tmp_path / n, [n])[n] for n in names}
    _assert_same(together, alone)
    # the pipeline equals the original one done by hand: cv2.imread (EXIF applied, alpha dropped, 16-bit
    # high byte, any format by content), cv2 INTER_LINEAR resize, ImageNet normalisation, the model alone
    import cv2

    from kernel.models import IMAGENET_MEAN, IMAGENET_STD, load_model

    for name in ("dolg_effnet_b5_768", "hybrid_b3_swin224_896", "effnet_b5_704"):
        entry = next(e for e in entries if e["name"] == name)
        model = load_model(entry, tiny_weights[0])
        size = entry["image_size"]
        ids, emb = together[name]
        for rid in checked:
            path = next(r.path for r in records if r.id == rid)
            img = cv2.resize(cv2.imread(path, cv2.IMREAD_COLOR)[:, :, ::-1], (size, size),
                             interpolation=cv2.INTER_LINEAR)
            x = (torch.from_numpy(img.copy()).permute(2, 0, 1).float()[None]
                 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
            with torch.no_grad():
                ref = model(x)[0].numpy()
            np.testing.assert_allclose(emb[ids.tolist().index(rid)], ref, atol=REFERENCE_ATOL, err_msg=f"{name} {rid}")


def test_store_contents_and_broken_images(entries, tiny_weights, images, tmp_path, monkeypatch):
    records = folder_source(images)
    st = tmp_path / "s"
    s = _run(entries, tiny_weights, records, st, THREE, dtype="float16")
    good = sorted(r.id for r in records if r.id not in BROKEN)
    assert s.complete and s.new_failures == 3
    assert {k: v.split(" ")[0] for k, v in s.failures.items()} == {
        "broken_empty": "empty", "broken_text": "not", "broken_trunc": "truncated"}
    on_disk = kstore.read_failures(st, "test")
    assert on_disk.keys() == BROKEN.keys() and all(BROKEN[k] in on_disk[k] for k in BROKEN)
    assert "3 failures" in s.line() and "broken_empty: empty file" in s.line()
    for n in THREE:
        ids, emb = kstore.load_split(st, n, "test", dim=512)
        assert ids.tolist() == good  # id order, broken ones absent
        with np.load(kstore.split_path(st, n, "test")) as z:
            assert z["embeddings"].dtype == np.float16
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=2e-3)
        meta = kstore.read_meta(st, n)
        entry = next(e for e in entries if e["name"] == n)
        assert meta["name"] == n and meta["family"] == entry["family"]
        assert meta["image_size"] == entry["image_size"] and meta["sha256"] == entry["sha256"]
        assert not kstore.parts_dir(st, n, "test").exists()
    # a second run computes nothing, does not load a model and does not retry the broken images
    import kernel.models

    def no_load(*a, **k):
        raise AssertionError("a completed split must not load models")

    with monkeypatch.context() as m:
        m.setattr(kernel.models, "load_model", no_load)
        again = _run(entries, tiny_weights, records, st, THREE, dtype="float16")
    assert again.complete and sum(again.computed.values()) == 0 and again.new_failures == 0
    assert again.present == {n: len(good) for n in THREE} and len(again.failures) == 3
    # retrying failures decodes them again (and they fail again, still reported)
    retry = _run(entries, tiny_weights, records, st, THREE, dtype="float16", retry_failures=True)
    assert retry.complete and len(retry.failures) == 3 and retry.new_failures == 0


def test_interrupted_by_max_batches_or_crash_resumes_identical(entries, tiny_weights, images, tmp_path):
    records = folder_source(images)
    _run(entries, tiny_weights, records, tmp_path / "ref", THREE)
    ref = _load(tmp_path / "ref", THREE)

    st = tmp_path / "stopped"
    s = _run(entries, tiny_weights, records, st, THREE, max_batches=2, flush_images=1)
    assert not s.complete and s.stopped == "max_batches" and "INCOMPLETE" in s.line()
    assert all(not kstore.has_split(st, n, "test") for n in THREE)
    good8 = sum(r.id not in BROKEN for r in records[:8])
    assert all(len(kstore.read_parts(st, n, "test")[0]) == good8 for n in THREE)
    s2 = _run(entries, tiny_weights, records, st, THREE)
    assert s2.complete and all(s2.present[n] == good8 for n in THREE)
    _assert_same(ref, _load(st, THREE))

    st = tmp_path / "crashed"
    calls = []

    def crash(progress):
        calls.append(progress)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(entries, tiny_weights, records, st, THREE, on_batch=crash)
    assert [p.done for p in calls] == [4, 8, 12] and calls[0].total == len(records)
    assert calls[-1].images_per_s > 0 and set(calls[-1].model_seconds) == set(THREE)
    # the finally block kept the three finished batches even though flush_images was never reached
    good12 = sum(r.id not in BROKEN for r in records[:12])
    assert all(len(kstore.read_parts(st, n, "test")[0]) == good12 for n in THREE)
    _run(entries, tiny_weights, records, st, THREE)
    _assert_same(ref, _load(st, THREE))


def test_deadline_stops_cleanly_and_resumes(entries, tiny_weights, images, tmp_path, monkeypatch):
    records = folder_source(images)
    st = tmp_path / "s"
    real = time.monotonic
    jump = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: real() + jump[0])

    def after_first_batch(progress):
        jump[0] = 1e6  # the clock passes the deadline while the first batch is finished

    s = _run(entries, tiny_weights, records, st, THREE, deadline=real() + 1000, on_batch=after_first_batch)
    assert s.stopped == "deadline" and not s.complete and s.computed == {n: 4 for n in THREE}
    monkeypatch.setattr(time, "monotonic", real)
    past = _run(entries, tiny_weights, records, st, THREE, deadline=real() - 1)
    assert past.stopped == "deadline" and sum(past.computed.values()) == 0
    done = _run(entries, tiny_weights, records, st, THREE)
    assert done.complete
    _run(entries, tiny_weights, records, tmp_path / "ref", THREE)
    _assert_same(_load(tmp_path / "ref", THREE), _load(st, THREE))


@pytest.mark.slow
def test_sigkill_then_resume_is_identical(entries, tiny_weights, images, tmp_path):
    weights, manifest = tiny_weights
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "kernel", "extract", "--manifest", str(manifest), "--weights", str(weights),
           "--images", str(images), "--split", "test", "--models", ",".join(THREE), "--batch-size", "1",
           "--workers", "0", "--flush-images", "1", "--dtype", "float32", "--no-progress", "--store", str(killed)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    part = kstore.parts_dir(killed, THREE[0], "test")
    t0 = time.monotonic()
    while not (part.is_dir() and len(list(part.glob("part-*.npz"))) >= 2):
        assert proc.poll() is None, "the extraction ended before it could be killed"
        assert time.monotonic() - t0 < 120
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not any(kstore.has_split(killed, n, "test") for n in THREE)
    records = folder_source(images)
    s = _run(entries, tiny_weights, records, killed, THREE, batch_size=1)
    assert s.complete and len(s.failures) == 3 and 0 < sum(s.present.values())
    _run(entries, tiny_weights, records, tmp_path / "ref", THREE, batch_size=1)
    _assert_same(_load(tmp_path / "ref", THREE), _load(killed, THREE))


@pytest.mark.slow
def test_shards_merge_into_the_unsharded_result(entries, tiny_weights, images, tmp_path):
    records = folder_source(images)
    _run(entries, tiny_weights, records, tmp_path / "ref", THREE)
    for i in range(3):  # three "machines", each with its own store
        s = _run(entries, tiny_weights, records, tmp_path / f"m{i}", THREE, shard=(i, 3))
        assert s.complete and s.images == len(records[i::3])
        assert not any(kstore.has_split(tmp_path / f"m{i}", n, "test") for n in THREE)
    merged = tmp_path / "merged"
    for i in range(3):  # copy every shard's parts and failures into one store
        shutil.copytree(tmp_path / f"m{i}", merged, dirs_exist_ok=True)
    assert len(list((merged / "failures").glob("test.shard-*-of-3.csv"))) >= 1
    s = _run(entries, tiny_weights, records, merged, THREE)
    assert s.complete and sum(s.computed.values()) == 0 and len(s.failures) == 3
    # each shard batches every third image: same descriptors up to float rounding of other batch shapes
    _assert_same(_load(tmp_path / "ref", THREE), _load(merged, THREE), atol=ROUNDING_ATOL)
    # model by model in one call (group size 1: images decoded once per model). The groups after the first
    # skip the broken images, so their batches are composed differently: equal up to float rounding
    s = _run(entries, tiny_weights, records, tmp_path / "g1", THREE, group_size=1)
    assert s.complete and s.new_failures == 3
    _assert_same(_load(tmp_path / "ref", THREE), _load(tmp_path / "g1", THREE), atol=ROUNDING_ATOL)
    assert kstore.read_failures(merged, "test").keys() == BROKEN.keys()


def test_new_images_are_added_to_a_completed_split(entries, tiny_weights, images, tmp_path):
    records = folder_source(images)
    st = tmp_path / "s"
    first = _run(entries, tiny_weights, records[:10], st, THREE)
    assert first.new_failures == 3 and kstore.read_failures(st, "test").keys() == BROKEN.keys()
    # a call on other images (e.g. predict's probe) keeps the failure rows of the images it did not see
    probe = _run(entries, tiny_weights, records[-2:], st, THREE)
    assert probe.failures == {} and kstore.read_failures(st, "test").keys() == BROKEN.keys()
    s = _run(entries, tiny_weights, records, st, THREE)
    assert s.present == {n: sum(r.id not in BROKEN for r in records[:10] + records[-2:]) for n in THREE}
    assert s.complete and s.new_failures == 0  # the broken ones were known: not decoded again
    ids, _ = kstore.load_split(st, THREE[0], "test")
    assert ids.tolist() == sorted(r.id for r in records if r.id not in BROKEN)


def test_changed_checkpoint_is_refused_unless_overwrite(entries, tiny_weights, images, tmp_path):
    records = folder_source(images)[:4]
    st = tmp_path / "s"
    _run(entries, tiny_weights, records, st, THREE[:1])
    meta = kstore.read_meta(st, THREE[0])
    meta["sha256"] = "0" * 64
    kstore.write_meta(st, THREE[0], meta)
    with pytest.raises(KernelError, match=r"meta\.json.*sha256.*--overwrite"):
        _run(entries, tiny_weights, records, st, THREE[:1])
    s = _run(entries, tiny_weights, records, st, THREE[:1], overwrite=True)
    assert s.computed[THREE[0]] == 4 and kstore.read_meta(st, THREE[0])["sha256"] != "0" * 64


def test_memory_budget_splits_models_into_groups(entries, tiny_weights, monkeypatch):
    one = kx.model_bytes(entries[0], tiny_weights[0])
    assert one > 0
    assert [len(g) for g in kx.plan_groups(entries, tiny_weights[0], "cpu")] == [9]
    monkeypatch.setattr(kernel.extract.planning, "_device_memory", lambda device: 1)
    groups = kx.plan_groups(entries, tiny_weights[0], "cpu")
    assert [len(g) for g in groups] == [1] * 9
    assert [g[0]["priority"] for g in groups] == sorted(e["priority"] for e in entries)
    assert [len(g) for g in kx.plan_groups(entries, tiny_weights[0], "cpu", group_size=4)] == [4, 4, 1]


def test_cli_extract_on_a_kaggle_folder(tiny_weights, tmp_path, capsys):
    weights, manifest = tiny_weights
    comp = tmp_path / "comp"
    ids = [p.stem for p in SAMPLES[:5]]
    for i, p in zip(ids, SAMPLES):
        dst = comp / "test" / i[0] / i[1] / i[2] / f"{i}.jpg"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dst)
    listed = ids + ["ffff0000aaaa0000"]  # listed, but no file: a "missing file" failure
    (comp / "sample_submission.csv").write_text("id,landmarks\n" + "".join(f"{i},\n" for i in listed))
    st = tmp_path / "store"
    rc = main(["extract", "--manifest", str(manifest), "--weights", str(weights), "--images", str(comp),
               "--split", "test", "--store", str(st), "--models", ",".join(THREE), "--workers", "1",
               "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "extract test: 6 images, 1 failures" in out and "complete" in out
    assert kstore.read_failures(st, "test") == {"ffff0000aaaa0000": "missing file"}
    assert kstore.list_models(st) == sorted(THREE)
    assert kstore.load_split(st, THREE[1], "test")[0].tolist() == sorted(ids)


@pytest.mark.parametrize("change,message", [
    ({"--images": "/nonexistent/folder"}, "/nonexistent/folder: image source not found"),
    ({"--manifest": "/nonexistent/m.json"}, "m.json: manifest not found"),
    ({"--models": "nope"}, "unknown model 'nope'"),
    ({"--shard": "5/2"}, "--shard"),
    ({"--split": "a/b"}, "split name"),
])
def test_cli_bad_input_is_one_clear_error(tiny_weights, images, tmp_path, capsys, change, message):
    weights, manifest = tiny_weights
    args = {"--manifest": str(manifest), "--weights": str(weights), "--images": str(images), "--split": "test",
            "--store": str(tmp_path / "s"), "--models": THREE[0]}
    args.update(change)
    rc = main(["extract", *[x for kv in args.items() for x in kv], "--no-progress", "--workers", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err and "Traceback" not in err


def test_cli_help_lists_extract(capsys):
    with pytest.raises(SystemExit):
        main(["extract", "--help"])
    assert "--group-size" in capsys.readouterr().out


def test_store_that_is_a_file_is_one_clear_error(entries, tiny_weights, images, tmp_path):
    f = tmp_path / "store.txt"
    f.write_text("not a folder")
    with pytest.raises(KernelError, match="store.txt: cannot create the descriptor store"):
        _run(entries, tiny_weights, folder_source(images), f, THREE[:1])
    with pytest.raises(KernelError, match="appears more than once"):
        recs = folder_source(images)
        _run(entries, tiny_weights, recs + recs[:1], tmp_path / "s", THREE[:1])
