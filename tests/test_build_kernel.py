"""build_kernel.py: from demo checkpoints to a Kaggle dataset + notebook, and the notebook run offline.

The main test builds from the tiny demo preset, then executes the generated notebook's cells in a subprocess
against a fake ``/kaggle`` tree (``KAGGLE_ROOT``) holding a generated competition, with the network unavailable
(``unshare --net`` when permitted, otherwise unroutable proxies + ``PIP_NO_INDEX``), and with an image whose
timm is "too old" so the offline wheel install really runs. The kernel package is imported from the dataset's
copy, never from the repository.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernel.bundle import convert, notebook
from kernel.bundle.build import BundleOptions, build_bundle
from kernel.errors import KernelError

slow = pytest.mark.slow  # end-to-end: subprocesses, whole runs (the fast loop skips them)

ROOT = Path(__file__).resolve().parents[1]
SLUG = "glr-test-bundle"
# one model per family, the fastest of the tiny preset; all three serve both tracks
MODELS = ["dolg_effnet_b7_448_s1", "hybrid_b6_swin384_384", "effnet_b6_512"]
RUNNER = """
import json, sys
cells = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
for i, source in enumerate(cells):
    print(f"---- cell {i}", flush=True)
    exec(compile(source, f"<cell {i}>", "exec"), namespace)
"""


# ------------------------------------------------------------------------------------------ helpers

def offline_prefix() -> tuple[list[str], dict, str]:
    """How to take the network away from a subprocess: a fresh network namespace, or dead proxies."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "--net", "true"], capture_output=True).returncode == 0:
        return [unshare, "--net"], {}, "unshare --net (no network interface but loopback)"
    dead = "http://10.255.255.1:9"
    env = {"HTTP_PROXY": dead, "HTTPS_PROXY": dead, "ALL_PROXY": dead, "http_proxy": dead, "https_proxy": dead,
           "NO_PROXY": "", "PIP_NO_INDEX": "1"}
    return [], env, "unroutable proxies + PIP_NO_INDEX=1 (unshare not permitted)"


def run_notebook(code_cells: list[str], kaggle_root: Path, tmp: Path, extra_env=None, timeout=300):
    """Execute the cells in order, in one namespace, in a subprocess without network; returns the result."""
    cells_file = tmp / "cells.json"
    cells_file.write_text(json.dumps(code_cells))
    runner = tmp / "run_cells.py"
    runner.write_text(RUNNER)
    prefix, net_env, how = offline_prefix()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KERNEL_DEVICE")}
    env.update(net_env, KAGGLE_ROOT=str(kaggle_root), **(extra_env or {}))
    res = subprocess.run(prefix + [sys.executable, str(runner), str(cells_file)], cwd=tmp, env=env,
                         capture_output=True, text=True, timeout=timeout)
    res.offline = how
    return res


def fake_kaggle(root: Path, dataset: Path, competitions: dict) -> Path:
    """``root/input/<slug>`` (the dataset), ``root/input/<competition>``, an empty ``root/working``."""
    shutil.copytree(dataset, root / "input" / SLUG)
    for name, folder in competitions.items():
        shutil.copytree(folder, root / "input" / name)
    (root / "working").mkdir(parents=True)
    return root


def old_timm_site(tmp: Path) -> Path:
    """A site folder whose only content says 'timm 0.0.1 is installed': the image lacks the pinned timm."""
    site = tmp / "old-image-site"
    (site / "timm-0.0.1.dist-info").mkdir(parents=True)
    (site / "timm-0.0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: timm\nVersion: 0.0.1\n")
    return site


def bundle(weights, out, user, **options) -> dict:
    """``build_bundle`` with the options as keywords, as the command line gives them."""
    return build_bundle(BundleOptions(weights, out, user, **options))


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def timm_wheel():
    """The pinned timm wheel (cache, else pip download into the cache); skip only if none can be had."""
    from kernel.bundle import wheels

    try:
        return wheels.resolve(wheels.default_requirements())[0]
    except KernelError as exc:
        pytest.skip(f"no timm wheel obtainable here: {exc}")


@pytest.fixture(scope="module")
def competition(tmp_path_factory):
    from kernel.demo.competition import make_competition

    return make_competition(tmp_path_factory.mktemp("competition"), train_views=2, test_views=1, index_views=1,
                            test_distractors=2, index_distractors=2, bank_size=4, max_side=160)


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_weights, competition):
    """Precomputed with the original checkpoints: train for all three models, index for two (the third
    model's index descriptors are extracted by the retrieval notebook's run)."""
    from kernel.data.sources import kaggle_split
    from kernel.extract import extract
    from kernel.models import load_manifest, select

    weights, manifest = tiny_weights
    entries = select(load_manifest(manifest), MODELS)
    out = tmp_path_factory.mktemp("store")
    kw = dict(device="cpu", progress=False, workers=0)
    extract(entries, weights, kaggle_split(competition.recognition, "train"), "train", out, **kw)
    extract(entries[:2], weights, kaggle_split(competition.retrieval, "index"), "index", out, **kw)
    from kernel.cli import main as kernel_main  # the test-independent work, prepared offline

    assert kernel_main(["prepare", "--store", str(out), "--train-labels", str(competition.recognition / "train.csv"),
                        "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_weights, timm_wheel, competition, store):
    weights, manifest = tiny_weights
    out = tmp_path_factory.mktemp("bundle") / "build"
    report = bundle(weights, out, "tester", manifest=manifest, slug=SLUG, track="both", models=MODELS,
                          store=store, train_labels=competition.recognition / "train.csv", fp16=True,
                          predict_args=["--chunks", "1", "--workers", "0"], progress=False)
    return out, report


# ------------------------------------------------------------------------------------------ the build

@slow
def test_dataset_layout_and_metadata(built, store):
    out, report = built
    dataset = out / "dataset"
    meta = json.loads((dataset / "dataset-metadata.json").read_text())
    assert meta["id"] == f"tester/{SLUG}" and meta["licenses"][0]["name"] and 6 <= len(meta["title"]) <= 50
    assert (dataset / "kernel" / "predict.py").is_file() and not list(dataset.rglob("__pycache__"))
    assert (dataset / "wheels" / "requirements.txt").read_text().startswith("timm==")
    assert (dataset / "train.csv").is_file()
    manifest = json.loads((dataset / "weights_manifest.json").read_text())["models"]
    assert [e["name"] for e in manifest] == MODELS
    build = json.loads((dataset / "BUILD.json").read_text())
    for e in manifest:  # every sha256 filled in, and right
        assert build["files"][f"weights/{e['checkpoint']}"]["sha256"] == e["sha256"]
        sd = torch.load(dataset / "weights" / e["checkpoint"], weights_only=True)["model"]
        assert not [k for k in sd if k.startswith(("head.", "metric_classify."))]
        assert all(v.dtype == torch.float16 for v in sd.values() if v.is_floating_point())
    for row in report["checkpoints"]:
        assert row["check"] == "cosine>=0.999" and row["min_cosine"] >= 0.999 and row["size"] < row["source_size"]
    # shipped store metas name the shipped (converted) checkpoint and the one that computed them
    for e in manifest:
        m = json.loads((dataset / "store" / e["name"] / "meta.json").read_text())
        src = json.loads((store / e["name"] / "meta.json").read_text())
        assert m["sha256"] == e["sha256"] and m["computed_with_sha256"] == src["sha256"] != e["sha256"]
    assert sorted((r["model"], r["split"]) for r in report["stores"] if r["split"] != "prepared") == sorted(
        [(m, "train") for m in MODELS] + [(m, "index") for m in MODELS[:2]])
    # the prepared artefacts travel with the store: recognition family descriptors, index labels of two models
    shipped = sorted(p.name for p in (dataset / "store" / "prepared").iterdir())
    assert shipped == sorted(["recognition_train.npz"] + [f"retrieval_{m}.npz" for m in MODELS[:2]])
    assert (dataset / "store" / MODELS[0] / "index.npz").is_file()
    assert not (dataset / "store" / MODELS[2] / "index.npz").exists()
    # notebooks: one per competition, GPU on, internet off, both sources
    for track, comp in notebook.COMPETITIONS.items():
        km = json.loads((out / "notebook" / track / "kernel-metadata.json").read_text())
        assert km["enable_gpu"] is True and km["enable_internet"] is False and km["kernel_type"] == "notebook"
        assert km["machine_shape"] == "NvidiaTeslaT4"  # the default accelerator: Kaggle's T4 x2
        assert km["dataset_sources"] == [f"tester/{SLUG}"] and km["competition_sources"] == [comp]
        nb = (out / "notebook" / track / km["code_file"]).read_text()
        cells = notebook.code_cells_of(nb)
        assert not any(line.lstrip().startswith(("!", "%")) for c in cells for line in c.splitlines())
    text = (out / "report.txt").read_text()
    assert "timm-" in text and "kaggle datasets create" in text and "weights/effnet_b6_512.pth" in text
    assert report["total_size"] == sum(v["size"] for v in report["files"].values())
    assert not list(out.parent.glob(".build.*"))  # no staging folder left


@slow
def test_notebook_runs_offline_and_writes_the_submission(built, competition, tmp_path):
    out, report = built
    root = fake_kaggle(tmp_path / "kaggle", out / "dataset",
                       {"landmark-recognition-2021": competition.recognition})
    cells = notebook.code_cells_of((out / "notebook" / "recognition" / f"{SLUG}-recognition.ipynb").read_text())
    res = run_notebook(cells, root, tmp_path, extra_env={"PYTHONPATH": str(old_timm_site(tmp_path))})
    log = res.stdout + res.stderr
    assert res.returncode == 0, f"notebook failed ({res.offline}):\n{log[-6000:]}"
    # offline install from the dataset's wheel, and the package from the dataset, not the repository
    assert "timm: image has 0.0.1, installing" in log
    assert f"timm_file: {root / 'working' / 'pylib' / 'timm'}" in log
    assert f"kernel: {root / 'input' / SLUG / 'kernel' / '__init__.py'}" in log
    # the machine at the top: which torch; no GPU here, said loudly, and the submission is still written
    import torch

    assert f"torch {torch.__version__} (CUDA build" in log
    if not torch.cuda.is_available():
        assert "!!! NO USABLE GPU" in log
    rows = read_csv(root / "working" / "submission.csv")
    assert rows[0] == ["id", "landmarks"]
    test_ids = {r[0] for r in read_csv(competition.recognition / "sample_submission.csv")[1:]}
    assert {r[0] for r in rows[1:]} == test_ids and len(rows) - 1 == len(test_ids)
    predicted = {r[0]: r[1].split() for r in rows[1:] if r[1]}
    assert len(predicted) >= len(test_ids) - len(competition.broken) - 1
    for image_id in competition.broken:
        assert image_id not in predicted
    assert all(int(p[0]) in competition.landmarks and float(p[1]) == float(p[1]) for p in predicted.values())


@slow
def test_retrieval_notebook_runs_offline(built, competition, tmp_path):
    out, _ = built
    root = fake_kaggle(tmp_path / "kaggle", out / "dataset", {"landmark-retrieval-2021": competition.retrieval})
    cells = notebook.code_cells_of((out / "notebook" / "retrieval" / f"{SLUG}-retrieval.ipynb").read_text())
    res = run_notebook(cells, root, tmp_path)
    log = res.stdout + res.stderr
    assert res.returncode == 0, f"notebook failed ({res.offline}):\n{log[-6000:]}"
    assert "timm 1.0.31: already installed" in log  # the image has the pinned version: nothing installed
    for m in MODELS[:2]:  # shipped index labels used as they are (the third model's are computed once)
        assert any("using prepared" in line and line.endswith(f"/store/prepared/retrieval_{m}.npz")
                   for line in log.splitlines()), m
    rows = read_csv(root / "working" / "submission.csv")
    assert rows[0] == ["id", "images"]
    index_ids = {p.stem for p in (competition.retrieval / "index").rglob("*.jpg")}
    assert {r[0] for r in rows[1:]} == {r[0] for r in read_csv(competition.retrieval / "sample_submission.csv")[1:]}
    answered = [r[1].split() for r in rows[1:] if r[1]]
    assert answered and all(set(a) <= index_ids and len(a) <= 100 for a in answered)


def _saved_output(working: Path) -> set[str]:
    """What a run left under the notebook's saved output folder, the installed wheels (pylib/) aside."""
    return {str(p.relative_to(working)) for p in working.rglob("*")
            if p.is_file() and p.relative_to(working).parts[0] != "pylib"}


@slow
def test_recognition_notebook_on_the_scored_rerun(built, competition, tmp_path):
    # the rerun's train folder gained a new landmark (its images never shipped) and lost shipped ids; its test
    # set is three times the public one plus copies of the new landmark's train images
    from kernel.rerun import make_rerun

    out, _ = built
    info = make_rerun(competition.recognition, tmp_path / "rerun", "recognition", test_factor=3, seed=3)
    root = fake_kaggle(tmp_path / "kaggle", out / "dataset", {"landmark-recognition-2021": tmp_path / "rerun"})
    cells = notebook.code_cells_of((out / "notebook" / "recognition" / f"{SLUG}-recognition.ipynb").read_text())
    res = run_notebook(cells, root, tmp_path)
    log = res.stdout + res.stderr
    assert res.returncode == 0, f"notebook failed ({res.offline}):\n{log[-6000:]}"
    assert f"train labels: {root / 'input' / 'landmark-recognition-2021' / 'train.csv'} (the competition's own)" in log
    # the notebook's first line says which run this is, from the folder's sizes against the public ones
    first = next(line for line in res.stdout.splitlines() if not line.startswith("---- cell"))
    assert first.startswith(f"this run: the scored rerun, not the public recognition folder: test "
                            f"{info['test_images']} (public 10000)")
    rows = {r[0]: r[1] for r in read_csv(root / "working" / "submission.csv")[1:]}
    assert len(rows) == info["test_images"]
    for test_id, new_landmark in info["known_answers"].items():
        assert rows[test_id].split()[0] == new_landmark, (test_id, rows[test_id])
    assert _saved_output(root / "working") == {"submission.csv", "submission.log.json"}
    assert (root / "temp" / "kernel-work-recognition").is_dir()  # the working store: scratch, not saved


@slow
def test_rerun_rehearsal_reports_what_the_scored_run_would_do(built, competition, tmp_path, capsys):
    from kernel.cli import main as kernel_main

    out, _ = built
    code = kernel_main(["rerun", "--bundle", str(out), "--data", str(competition.retrieval), "--track", "retrieval",
                        "--out", str(tmp_path / "r"), "--test-factor", "2"])
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "r" / "rerun_report.json").read_text())
    assert code == 0, (printed, (tmp_path / "r" / "notebook.log").read_text()[-4000:])
    assert report["submission_valid"] and report["notebook_exit"] == 0 and report["peak_rss_gib"] > 0
    assert report["known_answers_right"] == report["known_answers"] == 3  # every added index image is returned
    assert report["saved_output_files"] == ["submission.csv", "submission.log.json"]
    cov = report["coverage"]["index"]
    assert {c["added"] for c in cov.values()} == {3} and {c["gone"] for c in cov.values()} == {2}
    assert "rerun rehearsal: notebook exit 0" in printed and "index: " in printed
    assert kernel_main(["rerun", "--bundle", str(out), "--data", str(competition.retrieval), "--track",
                        "retrieval", "--out", str(tmp_path / "r")]) == 2  # not a new folder: refused


@slow
@pytest.mark.parametrize("victim", ["weights/effnet_b6_512.pth", "kernel/predict.py"])
def test_notebook_refuses_a_tampered_dataset(built, competition, tmp_path, victim):
    out, _ = built
    root = fake_kaggle(tmp_path / "kaggle", out / "dataset",
                       {"landmark-recognition-2021": competition.recognition})
    path = root / "input" / SLUG / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    path.write_bytes(bytes(data))
    cells = notebook.code_cells_of((out / "notebook" / "recognition" / f"{SLUG}-recognition.ipynb").read_text())
    res = run_notebook(cells, root, tmp_path)
    assert res.returncode != 0
    assert "error: the dataset is not the one this notebook was built with" in res.stderr
    assert str(path) in res.stderr and "Traceback" not in res.stderr
    assert not (root / "working" / "submission.csv").exists()


@slow
def test_notebook_refuses_a_dataset_of_another_build(built, competition, tmp_path):
    out, _ = built
    root = fake_kaggle(tmp_path / "kaggle", out / "dataset",
                       {"landmark-recognition-2021": competition.recognition})
    build_json = root / "input" / SLUG / "BUILD.json"
    build_json.write_text(build_json.read_text().replace(_build_id(out), "000000000000"))
    cells = notebook.code_cells_of((out / "notebook" / "recognition" / f"{SLUG}-recognition.ipynb").read_text())
    res = run_notebook(cells, root, tmp_path)
    assert res.returncode != 0 and "is another build" in res.stderr


@slow
def test_notebook_finds_the_dataset_mounted_elsewhere(built, competition, tmp_path):
    out, _ = built
    root = tmp_path / "kaggle"
    shutil.copytree(out / "dataset", root / "input" / "datasets" / "tester" / SLUG)
    shutil.copytree(competition.recognition, root / "input" / "landmark-recognition-2021")
    (root / "working").mkdir()
    cells = notebook.code_cells_of((out / "notebook" / "recognition" / f"{SLUG}-recognition.ipynb").read_text())
    res = run_notebook(cells[:5], root, tmp_path)  # configure, which run, machine, find, verify
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"dataset: {root / 'input' / 'datasets' / 'tester' / SLUG} (build {_build_id(out)})" in res.stdout
    assert "verified 3 checkpoints" in res.stdout


def _build_id(out: Path) -> str:
    return json.loads((out / "dataset" / "BUILD.json").read_text())["build_id"]


# ------------------------------------------------------------------------------------------ conversions

@slow
def test_strip_only_keeps_descriptors_identical_and_no_conversion_copies_bytes(tiny_weights, timm_wheel, tmp_path):
    from kernel.models import load_manifest, load_model

    weights, manifest = tiny_weights
    report = bundle(weights, tmp_path / "strip", "tester", manifest=manifest, models="hybrid_b6_swin384_384",
                          progress=False)
    row = report["checkpoints"][0]
    assert row["check"] == "exact" and row["max_abs_diff"] == 0.0 and row["stripped_keys"] == ["head.weight"]
    entry = json.loads((tmp_path / "strip" / "dataset" / "weights_manifest.json").read_text())["models"][0]
    load_model(entry, tmp_path / "strip" / "dataset" / "weights")  # strict load, sha256 checked
    report = bundle(weights, tmp_path / "asis", "tester", manifest=manifest, models="hybrid_b6_swin384_384",
                          strip_heads=False, progress=False)
    src = next(e for e in load_manifest(manifest) if e["name"] == "hybrid_b6_swin384_384")
    assert report["checkpoints"][0]["sha256"] == src["sha256"]
    assert report["checkpoints"][0]["conversion"] == "copied unchanged"


@slow
def test_conversion_check_rejects_moved_descriptors():
    ref = torch.nn.functional.normalize(torch.randn(4, 512), dim=1)
    fp16 = convert.Conversion(fp16_tensors=3)
    convert.compare("m", ref, ref + 1e-4, fp16, 0.999)  # tiny change: accepted
    with pytest.raises(convert.ConversionError, match="model 'm'.*cosine"):
        convert.compare("m", ref, torch.nn.functional.normalize(torch.randn(4, 512), dim=1),
                        convert.Conversion(fp16_tensors=3), 0.999)
    with pytest.raises(convert.ConversionError, match="stripping the training head changed"):
        convert.compare("m", ref, ref + 1e-7, convert.Conversion(stripped_keys=["head.weight"]), 0.999)


@slow
def test_headless_build_is_a_script_kernel_and_replaces_an_earlier_build(tiny_weights, timm_wheel, tmp_path):
    weights, manifest = tiny_weights
    out = tmp_path / "build"
    report = bundle(weights, out, "tester", manifest=manifest, models="effnet_b6_512", progress=False,
                          accelerator="p100")
    assert (out / "notebook" / "glr2021-kernel-recognition.ipynb").is_file()
    km = json.loads((out / "notebook" / "kernel-metadata.json").read_text())
    assert km["enable_gpu"] is True and km["machine_shape"] == "NvidiaTeslaP100"
    assert any("retired" in w and "NvidiaTeslaT4" in w for w in report["warnings"])  # Kaggle runs it on a T4
    assert "retired" in (out / "report.txt").read_text()
    report = bundle(weights, out, "tester", manifest=manifest, models="effnet_b6_512", headless=True,
                          progress=False, accelerator="cpu")
    km = json.loads((out / "notebook" / "kernel-metadata.json").read_text())
    assert km["enable_gpu"] is False and "machine_shape" not in km and report["options"]["accelerator"] == "cpu"
    assert km["kernel_type"] == "script" and km["code_file"] == "glr2021-kernel-recognition.py"
    assert not (out / "notebook" / "glr2021-kernel-recognition.ipynb").exists()
    script = (out / "notebook" / km["code_file"]).read_text()
    compile(script, km["code_file"], "exec")
    assert "verify_dataset()" in script and "install_wheels()" in script and "check_submission()" in script


# ------------------------------------------------------------------------------------------ bad input

@pytest.fixture
def weights_copy(tiny_weights, tmp_path):
    """A private copy of two tiny checkpoints and their manifest, to break."""
    weights, manifest = tiny_weights
    out = tmp_path / "weights"
    out.mkdir()
    data = json.loads(manifest.read_text())
    data["models"] = [e for e in data["models"] if e["name"] in ("effnet_b6_512", "dolg_effnet_b7_448_s1")]
    for e in data["models"]:
        shutil.copyfile(weights / e["checkpoint"], out / e["checkpoint"])
    (out / "weights_manifest.json").write_text(json.dumps(data))
    return out, data


def _edit(folder: Path, data: dict, name: str, **fields) -> None:
    for e in data["models"]:
        if e["name"] == name:
            e.update(fields)
    (folder / "weights_manifest.json").write_text(json.dumps(data))


def _expect_failure(weights, tmp_path, match, **kw):
    out = tmp_path / "out" / "build"
    with pytest.raises(KernelError, match=match):
        bundle(weights, out, "tester", progress=False, **kw)
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


@slow
def test_unknown_model_name(weights_copy, tmp_path):
    _expect_failure(weights_copy[0], tmp_path, "unknown model 'nope'", models="effnet_b6_512,nope")


@slow
def test_hash_mismatch(weights_copy, tmp_path):
    folder, data = weights_copy
    _edit(folder, data, "effnet_b6_512", sha256="0" * 64)
    _expect_failure(folder, tmp_path, r"model 'effnet_b6_512': .*effnet_b6_512.pth has sha256 .* the manifest pins")


@slow
def test_missing_checkpoint(weights_copy, tmp_path):
    folder, data = weights_copy
    (folder / "dolg_effnet_b7_448_s1.pth").unlink()
    _expect_failure(folder, tmp_path, r"model 'dolg_effnet_b7_448_s1': checkpoint .* not found")


@slow
def test_checkpoint_that_does_not_fit_its_entry(weights_copy, tmp_path):
    folder, data = weights_copy
    _edit(folder, data, "effnet_b6_512", checkpoint="dolg_effnet_b7_448_s1.pth", sha256=None)
    _expect_failure(folder, tmp_path, r"model 'effnet_b6_512': .*dolg_effnet_b7_448_s1.pth does not fit")


@slow
def test_store_of_another_checkpoint(weights_copy, tmp_path):
    from kernel import store as kstore

    folder, data = weights_copy
    s = tmp_path / "store"
    kstore.save_split(s, "effnet_b6_512", "train", ["a", "b"], torch.eye(2, 512).numpy())
    kstore.write_meta(s, "effnet_b6_512", {"name": "effnet_b6_512", "family": "effnet", "sha256": "f" * 64})
    _expect_failure(folder, tmp_path, r"meta.json: descriptors of 'effnet_b6_512' were computed with checkpoint",
                    store=s)


@slow
def test_retrieval_needs_train_labels_and_train_descriptors(weights_copy, tmp_path):
    folder, _ = weights_copy
    _expect_failure(folder, tmp_path, "pass --train-labels", track="retrieval")
    labels = tmp_path / "train.csv"
    labels.write_text("id,landmark_id\nabc,1\n")
    _expect_failure(folder, tmp_path, "no precomputed train descriptors", track="retrieval", train_labels=labels)


@slow
def test_out_that_is_not_a_build_is_refused(weights_copy, tmp_path):
    out = tmp_path / "somewhere"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(KernelError, match="not an earlier build"):
        bundle(weights_copy[0], out, "tester", progress=False)
    assert (out / "precious.txt").read_text() == "keep me"


@slow
def test_cli_names_the_problem_without_a_traceback(weights_copy, tmp_path):
    out = tmp_path / "cli-out"
    res = subprocess.run([sys.executable, str(ROOT / "build_kernel.py"), "--weights", str(weights_copy[0]),
                          "--out", str(out), "--user", "tester", "--models", "nope", "--no-progress"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: unknown model 'nope'")
    assert "Traceback" not in res.stderr and not out.exists()


# ------------------------------------------------------------------------------------------ the steps, one by one

def _plan(tmp_path: Path, name: str = "m", data: bytes = b"checkpoint bytes", tracks=("recognition",)):
    """A checked model (as phase 1 leaves it) whose checkpoint file holds ``data``."""
    import hashlib

    from kernel.bundle.checks import ModelPlan

    source = tmp_path / "src" / f"{name}.pth"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(data)
    entry = {"name": name, "checkpoint": f"{name}.pth", "tracks": list(tracks), "sha256": None}
    return ModelPlan(entry, source, hashlib.sha256(data).hexdigest(), len(data))


def test_options_reject_a_bad_track_and_other_bad_values(tmp_path):
    with pytest.raises(KernelError, match=r"--track must be recognition, retrieval or both \(got 'all'\)"):
        BundleOptions(tmp_path, tmp_path / "out", "tester", track="all")
    with pytest.raises(KernelError, match=r"--deadline-hours must be in \(0, 12\]"):
        BundleOptions(tmp_path, tmp_path / "out", "tester", deadline_hours=13)
    with pytest.raises(KernelError, match="--user 'a b'"):
        BundleOptions(tmp_path, tmp_path / "out", "a b")
    with pytest.raises(KernelError, match="--check-images must be between 1 and the 13 bundled photos"):
        BundleOptions(tmp_path, tmp_path / "out", "tester", check_images=14)
    opts = BundleOptions(str(tmp_path), str(tmp_path / "out"), "tester", track="both", store=str(tmp_path))
    assert opts.tracks == ["recognition", "retrieval"] and opts.title == "glr2021-kernel bundle"
    assert opts.store == tmp_path and opts.out == tmp_path / "out" and opts.index_store is None
    assert opts.dataset_id == "tester/glr2021-kernel"


def test_select_models_names_an_unknown_model_and_keeps_the_track(tmp_path):
    from kernel.bundle.checks import select_models
    from kernel.demo.weights import REPO_MANIFEST
    from kernel.models import load_manifest

    entries = load_manifest(REPO_MANIFEST)
    with pytest.raises(KernelError, match="unknown model 'nope'"):
        select_models(entries, "effnet_b6_512,nope", ["recognition"], REPO_MANIFEST)
    with pytest.raises(KernelError, match="model 'effnet_b3_768' serves recognition, not the retrieval track"):
        select_models(entries, "effnet_b3_768", ["retrieval"], REPO_MANIFEST)
    chosen = [e["name"] for e in select_models(entries, None, ["retrieval"], REPO_MANIFEST)]
    assert len(chosen) == 8 and "effnet_b3_768" not in chosen and "effnet_b5_704" in chosen


def test_check_train_labels_reads_through_kernel_labels_naming_file_and_line(tmp_path):
    from kernel.bundle.checks import check_labels_for, check_train_labels

    labels = tmp_path / "train.csv"
    labels.write_text("id,landmark_id\nabc,1\ndef,1.5\n")
    with pytest.raises(KernelError, match=rf"{labels}:3: landmark_id '1.5'"):
        check_train_labels(labels)
    labels.write_text("id,landmark_id\nabc,1\nabc,2\n")  # what predict refuses, the build refuses
    with pytest.raises(KernelError, match=rf"{labels}:3: id abc appears twice"):
        check_train_labels(labels)
    labels.write_text("id,landmark\nabc,1\n")
    with pytest.raises(KernelError, match=rf"{labels}: column 'landmark_id' is missing"):
        check_train_labels(labels)
    labels.write_text("id,landmark_id\n")
    with pytest.raises(KernelError, match=rf"{labels}: no rows"):
        check_train_labels(labels)
    with pytest.raises(KernelError, match=r"--train-labels .*missing.csv: file not found"):
        check_train_labels(tmp_path / "missing.csv")
    labels.write_text("id,landmark_id\nabc,1\ndef,20\n")
    assert check_train_labels(labels) == 2 and check_labels_for(["recognition"], None) == 0
    with pytest.raises(KernelError, match="pass --train-labels"):
        check_labels_for(["retrieval"], None)


def test_shipping_a_checkpoint_records_its_sha256_and_fills_the_manifest(tmp_path):
    import hashlib

    from kernel.bundle import ship

    plan = _plan(tmp_path, data=b"\x00weights\xff" * 1000)
    dataset = tmp_path / "dataset"
    rows = ship.ship_checkpoints([plan], dataset, strip=False, fp16=False, tolerance=0.999, n_images=1,
                                 progress=False)
    shipped = dataset / "weights" / "m.pth"
    assert shipped.read_bytes() == plan.source.read_bytes()
    assert rows[0]["sha256"] == rows[0]["source_sha256"] == hashlib.sha256(shipped.read_bytes()).hexdigest()
    assert rows[0]["size"] == rows[0]["source_size"] == 9_000 and rows[0]["conversion"] == "copied unchanged"
    manifest = json.loads((dataset / "weights_manifest.json").read_text())["models"]
    assert manifest == [{**plan.entry, "sha256": rows[0]["sha256"]}]
    plan.source.write_bytes(b"changed after the check")  # the copy is checked against the checked bytes
    with pytest.raises(KernelError, match="changed since it was checked"):
        ship.ship_checkpoints([plan], tmp_path / "again", strip=False, fp16=False, tolerance=0.999, n_images=1,
                              progress=False)


def _imports_of(path: Path, module: str) -> set[str]:
    """The ``kernel`` modules a source file imports (anywhere in it, lazy imports included)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package
                package = module.split(".")[: -node.level] if path.name != "__init__.py" else module.split(".")
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m == "kernel" or m.startswith("kernel.")}


def test_bundle_ships_the_package_without_test_only_modules():
    """Every module the dataset ships is reachable from an entry point (``python -m kernel``, its commands,
    ``python -m kernel.train``); a module only the tests import (as ``kernel/synthetic.py`` was) is not shipped."""
    from kernel.bundle.checks import PACKAGE_DIR
    from kernel.bundle.ship import package_files
    from kernel.cli import COMMANDS

    files = package_files()
    assert "__init__.py" in files and "demo/sample_data/gldv2/NOTICE" in files
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc") or "/." in f or f.startswith(".")]
    modules = {}
    for rel in (f for f in files if f.endswith(".py")):
        parts = ["kernel", *Path(rel).with_suffix("").parts]
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = PACKAGE_DIR / rel
    reached, todo = set(), ["kernel", "kernel.__main__", "kernel.train.__main__", *COMMANDS.values()]
    while todo:
        name = todo.pop()
        if name in reached or name not in modules:
            continue
        reached.add(name)
        todo += _imports_of(modules[name], name)
        todo += [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]  # parent packages
    assert sorted(set(modules) - reached) == []
    assert "kernel.synthetic" not in modules


def test_dataset_metadata_and_notebooks_from_the_staged_files(tmp_path):
    from kernel.bundle import build

    dataset = tmp_path / "staging" / "dataset"
    (dataset / "kernel").mkdir(parents=True)
    (dataset / "kernel" / "a.py").write_text("x = 1\n")
    opts = BundleOptions(tmp_path, tmp_path / "out", "tester", track="both", headless=True, license_name="CC0-1.0",
                         predict_args=["--chunks", "1"])
    plan = _plan(tmp_path, tracks=("retrieval",))
    rows = [{"model": "m", "checkpoint": "m.pth", "sha256": "ab" * 32}]
    info = build.write_dataset_metadata(dataset, opts, [plan], rows)
    assert list(info["files"]) == ["kernel/a.py"] and len(info["build_id"]) == 12 and info["models"] == ["m"]
    assert json.loads((dataset / "BUILD.json").read_text())["build_id"] == info["build_id"]
    meta = json.loads((dataset / "dataset-metadata.json").read_text())
    assert meta == {"title": "glr2021-kernel bundle", "id": "tester/glr2021-kernel", "licenses": [{"name": "CC0-1.0"}]}
    nb_rows = build.write_notebooks(tmp_path / "staging", opts, info["build_id"], rows, [plan], {"store"})
    assert [r["id"] for r in nb_rows] == ["tester/glr2021-kernel-recognition", "tester/glr2021-kernel-retrieval"]
    assert nb_rows[1]["models"] == ["m"] and nb_rows[0]["models"] == []
    script = (tmp_path / "staging" / "notebook" / "retrieval" / "glr2021-kernel-retrieval.py").read_text()
    assert f"BUILD_ID = {info['build_id']!r}" in script and f"'m.pth': '{'ab' * 32}'" in script
    assert "STORE = 'store'" in script and "INDEX_STORE = None" in script and "TRAIN_LABELS = None" in script
    assert "PREDICT_ARGS = ['--chunks', '1']" in script
    km = json.loads((tmp_path / "staging" / "notebook" / "retrieval" / "kernel-metadata.json").read_text())
    assert km["kernel_type"] == "script" and km["competition_sources"] == ["landmark-retrieval-2021"]


def test_publish_replaces_an_earlier_build_in_one_rename(tmp_path):
    from kernel.bundle.build import make_staging, publish

    out = tmp_path / "build"
    out.mkdir()
    (out / "report.json").write_text("{}")
    staging = make_staging(out)
    assert staging.parent == tmp_path and staging.name.startswith(".build.staging-")
    (staging / "report.json").write_text('{"new": true}')
    publish(staging, out)
    assert json.loads((out / "report.json").read_text()) == {"new": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build"]  # no staging or old folder left


def test_an_earlier_build_holding_other_files_is_not_replaced(tmp_path):
    # a rebuild replaces the earlier build whole: a file the user put beside it would go with it, so it is refused
    from kernel.bundle.checks import check_out

    out = tmp_path / "build"
    (out / "dataset").mkdir(parents=True)
    (out / "report.json").write_text("{}")
    check_out(out)  # an earlier build: may be replaced
    (out / "my_notes.txt").write_text("keep me")
    with pytest.raises(KernelError, match=r"holds my_notes.txt besides an earlier build"):
        check_out(out)
    assert (out / "my_notes.txt").read_text() == "keep me"
