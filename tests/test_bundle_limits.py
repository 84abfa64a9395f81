"""Kaggle's dataset limits in the bundle builder (``kernel/bundle/limits.py``), and the warning of a recognition
build without train labels.

Builds are tiny (one model of the tiny demo preset, its checkpoint copied unchanged, a stand-in wheel made here:
no network), and the limits are made small with monkeypatch rather than writing gigabytes.
"""
from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

import pytest

from kernel.bundle import limits, ship
from kernel.bundle.build import BundleOptions, build_bundle
from kernel.errors import KernelError

LABELS_WARNING = "recognition track without --train-labels"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A stand-in for the timm wheel: a pure-Python wheel whose METADATA matches its name."""
    path = tmp_path_factory.mktemp("wheels") / "standin-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("standin-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: standin\nVersion: 1.0\n")
    return path


def build(tiny_weights, wheel, out: Path, **options) -> dict:
    weights, manifest = tiny_weights
    return build_bundle(BundleOptions(weights, out, "tester", manifest=manifest, models="effnet_b6_512",
                                      strip_heads=False, wheel_requirements=[str(wheel)], check_images=1,
                                      progress=False, **options))


def uploaded_files(dataset: Path) -> dict:
    """Counted independently of the code under test: every file but the top-level dataset-metadata.json."""
    return {p.relative_to(dataset).as_posix(): p.stat().st_size for p in dataset.rglob("*")
            if p.is_file() and p != dataset / "dataset-metadata.json"}


@pytest.fixture(scope="module")
def built(tiny_weights, wheel, tmp_path_factory):
    out = tmp_path_factory.mktemp("limits") / "build"
    return out, build(tiny_weights, wheel, out)


# ------------------------------------------------------------------------------------------ counting

def test_upload_counts_every_file_the_folder_uploads(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "a.txt").write_bytes(b"abc")
    (tmp_path / "sub" / "b.bin").write_bytes(b"0123456789")
    (tmp_path / "sub" / "deeper" / ".hidden").write_bytes(b"x")
    (tmp_path / "sub" / "dataset-metadata.json").write_bytes(b"{...}..")  # only the top-level one is metadata
    (tmp_path / "dataset-metadata.json").write_bytes(b"{...}")
    upload = limits.upload_of(tmp_path)
    assert upload.sizes == {"a.txt": 3, "sub/b.bin": 10, "sub/dataset-metadata.json": 7, "sub/deeper/.hidden": 1}
    assert (upload.files, upload.bytes) == (4, 21)
    assert upload.busiest_folder() == ("sub/", 2) and upload.largest_entry() == ("sub/", 18)
    assert upload.summary() == {"files": 4, "bytes": 21, "max_files": 1000, "max_bytes": 200 * 10**9}


def test_the_build_records_the_count_and_bytes_of_the_built_folder(built):
    out, report = built
    files = uploaded_files(out / "dataset")
    assert "BUILD.json" in files and "kernel/bundle/limits.py" in files
    assert report["upload"] == {"files": len(files), "bytes": sum(files.values()),
                                "max_files": limits.MAX_DATASET_FILES, "max_bytes": limits.MAX_DATASET_BYTES}
    assert json.loads((out / "report.json").read_text())["upload"] == report["upload"]
    assert f"upload with BUILD.json: {len(files):,} files" in (out / "report.txt").read_text()


# ------------------------------------------------------------------------------------------ refusing

def test_an_upload_over_a_limit_is_one_line_naming_count_limit_and_remedy(monkeypatch):
    upload = limits.Upload({f"store/m/{i}.npz": 10 for i in range(5)} | {"train.csv": 60})
    monkeypatch.setattr(limits, "MAX_DATASET_FILES", 4)
    with pytest.raises(KernelError) as exc:
        limits.check_upload(upload)
    text = str(exc.value)
    assert "\n" not in text and text.startswith("the dataset would upload 6 files, Kaggle takes at most 4 per dataset")
    assert "5 of them are in store/m/" in text and "--models" in text and "docs/kaggle.md#dataset-limits" in text
    with pytest.raises(KernelError, match="would upload 6 files or more, Kaggle takes at most 4"):
        limits.check_upload(upload, at_least=True)
    monkeypatch.setattr(limits, "MAX_DATASET_FILES", 6)
    monkeypatch.setattr(limits, "MAX_DATASET_BYTES", 109)
    with pytest.raises(KernelError) as exc:
        limits.check_upload(upload)
    text = str(exc.value)
    assert "\n" not in text and text.startswith("the dataset would upload 110 bytes (110 B), Kaggle takes at most 109")
    assert "train.csv takes 60 B" in text and "--fp16" in text
    monkeypatch.setattr(limits, "MAX_DATASET_BYTES", 110)
    limits.check_upload(upload)  # at the limits: accepted


def _refused(tiny_weights, wheel, out: Path, monkeypatch, match: str, staged: bool, **limit) -> None:
    """A build under ``limit`` raises ``match``; ``staged``: whether it got as far as writing the staging folder.
    ``out`` is left as it was and nothing else appears beside it."""
    before = sorted(p.name for p in out.parent.iterdir())
    report = (out / "report.json").read_text() if out.exists() else None
    writes = []
    monkeypatch.setattr(ship, "ship_package", lambda *a, _real=ship.ship_package: writes.append(1) or _real(*a))
    for name, value in limit.items():
        monkeypatch.setattr(limits, name, value)
    with pytest.raises(KernelError, match=match):
        build(tiny_weights, wheel, out)
    assert bool(writes) == staged
    assert sorted(p.name for p in out.parent.iterdir()) == before  # no staging or half-written folder left
    assert ((out / "report.json").read_text() if out.exists() else None) == report


def test_a_build_over_the_file_limit_is_refused_before_or_after_staging(tiny_weights, wheel, built, tmp_path,
                                                                         monkeypatch):
    exact = built[1]["upload"]["files"]
    out = tmp_path / "new" / "build"
    out.parent.mkdir()
    # the package alone is over: refused from the inputs, before anything is written
    _refused(tiny_weights, wheel, out, monkeypatch, r"files or more, Kaggle takes at most 10 per dataset",
             staged=False, MAX_DATASET_FILES=10)
    # only the files written by the build itself (BUILD.json, manifest, requirements) go over: refused when staged
    _refused(tiny_weights, wheel, out, monkeypatch,
             rf"would upload {exact:,} files, Kaggle takes at most {exact - 1:,}", staged=True,
             MAX_DATASET_FILES=exact - 1)
    assert not out.exists()


def test_a_build_over_the_byte_limit_is_refused_and_keeps_the_earlier_build(tiny_weights, wheel, built, tmp_path,
                                                                            monkeypatch):
    exact = built[1]["upload"]["bytes"]
    out = tmp_path / "build"
    build(tiny_weights, wheel, out)  # an earlier build, which a refused rebuild must leave in place
    _refused(tiny_weights, wheel, out, monkeypatch, r"bytes \(.*\) or more, Kaggle takes at most 1,000 \(1.0 KB\)",
             staged=False, MAX_DATASET_BYTES=1000)
    _refused(tiny_weights, wheel, out, monkeypatch,
             rf"would upload {exact:,} bytes .*, Kaggle takes at most {exact - 1:,}", staged=True,
             MAX_DATASET_BYTES=exact - 1)


def test_the_command_line_ends_in_one_error_line_with_exit_code_2(tiny_weights, wheel, tmp_path, monkeypatch, capsys):
    import build_kernel

    weights, manifest = tiny_weights
    monkeypatch.setattr(limits, "MAX_DATASET_FILES", 10)
    out = tmp_path / "cli" / "build"
    rc = build_kernel.main(["--weights", str(weights), "--manifest", str(manifest), "--out", str(out), "--user",
                            "tester", "--models", "effnet_b6_512", "--no-strip-heads", "--wheel", str(wheel),
                            "--check-images", "1", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "Traceback" not in "\n".join(err) and not out.exists()
    assert err[-1].startswith("error: the dataset would upload ") and "Kaggle takes at most 10 per dataset" in err[-1]


# ------------------------------------------------------------------------------------------ train labels

def test_recognition_without_train_labels_warns_what_happens_on_kaggle(built, tmp_path, caplog):
    from kernel.bundle.checks import check_labels_for

    warnings = []
    with caplog.at_level(logging.WARNING, logger="kernel.bundle.checks"):
        assert check_labels_for(["recognition"], None, warnings) == 0
    [record] = [r for r in caplog.records if LABELS_WARNING in r.getMessage()]
    assert record.levelno == logging.WARNING and warnings == [record.getMessage()]
    assert "/kaggle/input/landmark-recognition-2021/train.csv at run time" in record.getMessage()
    assert any(LABELS_WARNING in w for w in built[1]["warnings"])  # and the build's report lists it
    caplog.clear()
    labels = tmp_path / "train.csv"
    labels.write_text("id,landmark_id\nabc,1\n")
    with caplog.at_level(logging.WARNING, logger="kernel.bundle.checks"):
        assert check_labels_for(["recognition"], labels, warnings) == 1
    assert not [r for r in caplog.records if LABELS_WARNING in r.getMessage()] and len(warnings) == 1
    with pytest.raises(KernelError, match="pass --train-labels"):
        check_labels_for(["recognition", "retrieval"], None, warnings)
