"""Hostile and careless input (issue 13): every case ends in one clean ``error:`` line (exit 2) or a logged
failure, and nothing the user had is deleted or overwritten.

``HOSTILE`` is the table: one row per input tried through the command line, each with what it must say and
the files that must come through unchanged (every file under the test folder is hashed before and after).
docs/reliability.md lists the same table for readers.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image

from kernel.cli import claim_dir, main, output_file, run_command
from kernel.errors import KernelError

ROOT = Path(__file__).resolve().parents[1]

ENTRY = {"name": "m1", "family": "effnet", "backbone": "efficientnet_b0", "image_size": 64, "stem_stride": 2,
         "group": "effnet", "tracks": ["recognition", "retrieval"], "checkpoint": "m1.pth", "sha256": None,
         "priority": 1}


def _jpeg(path: Path, colour=(120, 30, 200)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), colour).save(path, "JPEG")


def competition(tmp: Path, labels: str = "id,landmark_id\nfff001,7\nfff002,1005\n", test_ids=("abc001", "abd002")):
    """A minimal competition folder (test + train images, train.csv) and a weights folder with a manifest
    whose checkpoint does not exist (every case here ends before a model is loaded, or at loading)."""
    data = tmp / "data"
    for i in test_ids:
        _jpeg(data / "test" / i[0] / i[1] / i[2] / f"{i}.jpg")
    for i in ("fff001", "fff002"):
        _jpeg(data / "train" / i[0] / i[1] / i[2] / f"{i}.jpg")
    (data / "train.csv").write_text(labels)
    weights = tmp / "w"
    weights.mkdir()
    (weights / "weights_manifest.json").write_text(json.dumps({"models": [ENTRY]}))
    return data, weights


def predict_argv(tmp: Path, out: str, *extra) -> list[str]:
    return ["predict", "--track", "recognition", "--data", str(tmp / "data"), "--manifest",
            str(tmp / "w" / "weights_manifest.json"), "--weights", str(tmp / "w"), "--out", out, "--no-progress",
            *extra]


@dataclass
class Case:
    name: str
    setup: Callable[[Path], None]
    argv: Callable[[Path], list]
    needle: str  # regex the error output must match
    entry: str = "kernel"  # kernel: python -m kernel; train: python -m kernel.train


def _nothing(tmp):
    pass


def _user_folder(tmp):
    (tmp / "keep.py").write_text("print('my only copy')\n")
    (tmp / ".git").mkdir()
    (tmp / ".git" / "HEAD").write_text("ref: refs/heads/main\n")


def _store(tmp):
    import numpy as np

    from kernel import store

    store._save_npz(store.split_path(tmp / "st", "m1", "train"), ["fff001", "fff002"],
                    np.eye(2, 8, dtype=np.float32))
    (tmp / "labels.csv").write_text("id,landmark_id\nfff001,7\nfff002,7\n")


HOSTILE = [
    # ---- the six data-loss cases
    Case("dry-run --out . in a user's folder", _user_folder, lambda t: ["dry-run", "--out", "."],
         r"--out .*not empty and was not made by this command"),
    Case("dry-run --out an existing file", lambda t: (t / "f.txt").write_text("x"),
         lambda t: ["dry-run", "--out", "f.txt"], r"exists and is not a folder"),
    Case("predict --out DATA/train.csv", competition,
         lambda t: predict_argv(t, str(t / "data" / "train.csv")), r"train\.csv is a file inside the input folder"),
    Case("predict --out WEIGHTS/weights_manifest.json", competition,
         lambda t: predict_argv(t, str(t / "w" / "weights_manifest.json")), r"is an input of this run"),
    Case("train clean --out X --train-csv X", _store,
         lambda t: ["clean", "--store", str(t / "st"), "--train-csv", str(t / "labels.csv"), "--out",
                    str(t / "labels.csv")], r"is an input of this run", entry="train"),
    Case("predict --out a named pipe (as /dev/full)", lambda t: (competition(t), os.mkfifo(t / "pipe")),
         lambda t: predict_argv(t, str(t / "pipe")), r"not a regular file"),
    Case("demo-weights --out a folder of real checkpoints", lambda t: (t / "real").mkdir() or
         (t / "real" / "dolg_effnet_b5_768.pth").write_bytes(b"my month of training"),
         lambda t: ["demo-weights", "--out", str(t / "real")], r"not empty and was not made by this command"),
    Case("bundle --out inside the package it ships", lambda t: (t / "w").mkdir(),
         lambda t: ["bundle", "--weights", str(t / "w"), "--user", "me", "--out", str(ROOT / "kernel" / "build_out")],
         r"overlaps the input"),
    # ---- paths
    Case("predict --out ''", competition, lambda t: predict_argv(t, ""), r"--out: empty path"),
    Case("predict --out an existing folder", lambda t: (competition(t), (t / "dir").mkdir()),
         lambda t: predict_argv(t, str(t / "dir")), r"is a folder; name the file"),
    Case("predict --out under a file", lambda t: (competition(t), (t / "file").write_text("x")),
         lambda t: predict_argv(t, str(t / "file" / "sub.csv")), r"is a file, not a folder"),
    Case("demo-weights --out an existing file", lambda t: (t / "f.txt").write_text("x"),
         lambda t: ["demo-weights", "--out", "f.txt"], r"exists and is not a folder"),
    Case("postprocess --out the train labels", _store,
         lambda t: ["postprocess", "--track", "recognition", "--store", str(t / "st"), "--train-labels",
                    str(t / "labels.csv"), "--out", str(t / "labels.csv")], r"is an input of this run"),
    Case("profile --json over the manifest", lambda t: (t / "m.json").write_text(json.dumps({"models": [ENTRY]})),
         lambda t: ["profile", "--manifest", str(t / "m.json"), "--no-measure", "--json", str(t / "m.json")],
         r"is an input of this run"),
    # ---- numbers
    Case("predict --deadline-hours nan", competition, lambda t: predict_argv(t, "s.csv", "--deadline-hours", "nan"),
         r"--deadline-hours: must be a finite number"),
    Case("predict --reserve-minutes -100", competition,
         lambda t: predict_argv(t, "s.csv", "--reserve-minutes", "-100"), r"--reserve-minutes: must be >= 0"),
    Case("predict --workers -3", competition, lambda t: predict_argv(t, "s.csv", "--workers", "-3"),
         r"--workers: must be >= 0"),
    Case("postprocess --knn-k 0", _nothing,
         lambda t: ["postprocess", "--track", "retrieval", "--store", "s", "--train-labels", "l", "--out", "o",
                    "--knn-k", "0"], r"--knn-k: must be >= 1"),
    Case("postprocess --n-results -1", _nothing,
         lambda t: ["postprocess", "--track", "retrieval", "--store", "s", "--train-labels", "l", "--out", "o",
                    "--n-results", "-1"], r"--n-results: must be >= 1"),
    Case("profile --efficiency dolg=0", _nothing, lambda t: ["profile", "--no-measure", "--efficiency", "dolg=0"],
         r"--efficiency dolg=0: a fraction of peak must be in"),
    Case("profile --n-test -5", _nothing, lambda t: ["profile", "--no-measure", "--n-test", "-5"],
         r"--n-test: must be >= 0"),
    Case("manifest image_size 100000",
         lambda t: (t / "m.json").write_text(json.dumps({"models": [{**ENTRY, "image_size": 100000}]})),
         lambda t: ["profile", "--manifest", str(t / "m.json"), "--no-measure"], r"image_size.*between 1 and 2048"),
    # ---- labels (checked before any submission depends on them)
    Case("train.csv landmark id abc1005", lambda t: competition(t, "id,landmark_id\nfff001,7\nfff002,abc1005\n"),
         lambda t: predict_argv(t, str(t / "s.csv")), r"train\.csv:3: landmark_id 'abc1005' is not"),
    Case("train.csv landmark id 1005.0", lambda t: competition(t, "id,landmark_id\nfff001,1005.0\n"),
         lambda t: predict_argv(t, str(t / "s.csv")), r"train\.csv:2: landmark_id '1005\.0' is not"),
    Case("train.csv landmark id -4", lambda t: competition(t, "id,landmark_id\nfff001,-4\n"),
         lambda t: predict_argv(t, str(t / "s.csv")), r"train\.csv:2: landmark_id '-4' is not"),
    Case("train.csv landmark id above int64", lambda t: competition(t, "id,landmark_id\nfff001,9223372036854775808\n"),
         lambda t: predict_argv(t, str(t / "s.csv")), r"larger than the largest 64-bit integer"),
    # ---- validate compares text as Kaggle does
    Case("validate: +1005 is not 1005", lambda t: (
        (t / "sub.csv").write_text("id,landmarks\nq1,+1005 0.5\n"),
        (t / "sol.csv").write_text("id,landmarks,Usage\nq1,1005,Public\n")),
        lambda t: ["validate", "--track", "recognition", "--submission", "sub.csv", "--solution", "sol.csv"],
        r"sub\.csv:2: .*'\+1005' is not a non-negative integer"),
    Case("validate: tab separator", lambda t: (
        (t / "sub.csv").write_text("id,images\nq1,i1\ti2\n"),
        (t / "sol.csv").write_text("id,images,Usage\nq1,i1,Public\n")),
        lambda t: ["validate", "--track", "retrieval", "--submission", "sub.csv", "--solution", "sol.csv"],
        r"sub\.csv:2: parts must be separated by spaces"),
    Case("validate: an index id that is not in the index", lambda t: (
        _jpeg(t / "idx" / "i1.jpg"),
        (t / "sub.csv").write_text("id,images\nq1,i1 zz9\n"),
        (t / "sol.csv").write_text("id,images,Usage\nq1,i1,Public\n")),
        lambda t: ["validate", "--track", "retrieval", "--submission", "sub.csv", "--solution", "sol.csv",
                   "--index", "idx"], r"row q1 names zz9, which is not an index id"),
    Case("validate: latin-1 file", lambda t: (
        (t / "sub.csv").write_bytes("id,images\nq\xe9,i1\n".encode("latin-1")),
        (t / "sol.csv").write_text("id,images,Usage\nq1,i1,Public\n")),
        lambda t: ["validate", "--track", "retrieval", "--submission", "sub.csv", "--solution", "sol.csv"],
        r"sub\.csv: not UTF-8 text"),
    Case("validate: a 5 MB field", lambda t: (
        (t / "sub.csv").write_text("id,images\nq1,i1\n"),
        (t / "sol.csv").write_text("id,images,Usage\nq1," + "i" * 5_000_000 + ",Public\n")),
        lambda t: ["validate", "--track", "retrieval", "--submission", "sub.csv", "--solution", "sol.csv"],
        r"sol\.csv: not a readable CSV"),
]


def _snapshot(root: Path) -> dict:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if p.is_file() and not p.is_symlink():
                out[p.relative_to(root)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _run(argv, entry="kernel") -> int:
    if entry == "train":
        from kernel.train.cli import main as train_main

        runner = train_main
    else:
        runner = main
    try:
        return runner(argv)
    except SystemExit as exc:  # argparse's own error line
        return int(exc.code)


@pytest.mark.parametrize("case", HOSTILE, ids=lambda c: c.name)
def test_hostile_input_ends_in_one_clean_error_and_keeps_every_file(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    case.setup(tmp_path)
    before = _snapshot(tmp_path)
    code = _run(case.argv(tmp_path), case.entry)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert re.search(case.needle, err), err
    after = _snapshot(tmp_path)
    changed = [str(p) for p, h in before.items() if after.get(p) != h]
    assert not changed, f"changed or removed: {changed}"
    assert not (ROOT / "kernel" / "build_out").exists()


@pytest.mark.slow
def test_dry_run_out_dot_in_a_folder_holding_a_file_leaves_it(tmp_path):
    """The issue's proof, as a user types it: ``python -m kernel dry-run --out .``."""
    (tmp_path / "keep.py").write_text("print('mine')\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "kernel", "dry-run", "--out", "."], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: --out")
    assert (tmp_path / "keep.py").read_text() == "print('mine')\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.py"]


def test_own_folder_is_reused_and_only_its_own_entries_are_replaced(tmp_path):
    out = tmp_path / "dr"
    claim_dir(out, ".mark.json", owned=("store", "a.json"))
    (out / "store").mkdir()
    (out / "store" / "x.npz").write_bytes(b"old")
    (out / "a.json").write_text("{}")
    (out / "notes.txt").write_text("the user's")  # added by the user later
    claim_dir(out, ".mark.json", owned=("store", "a.json"))
    assert sorted(p.name for p in out.iterdir()) == [".mark.json", "notes.txt"]
    assert (out / "notes.txt").read_text() == "the user's"


def test_device_node_and_symlink_are_never_replaced(tmp_path):
    with pytest.raises(KernelError, match="not a regular file"):
        output_file("/dev/full")  # only checked, never opened
    (tmp_path / "real.csv").write_text("x")
    (tmp_path / "link.csv").symlink_to(tmp_path / "real.csv")
    with pytest.raises(KernelError, match="symbolic link"):
        output_file(tmp_path / "link.csv")


@pytest.mark.parametrize("err", [OSError(errno.EROFS, "Read-only file system", "/ro/submission.csv"),
                                 OSError(errno.ENOSPC, "No space left on device", "/full/store.npz"),
                                 NotADirectoryError(errno.ENOTDIR, "Not a directory", b"/x/caf\xe9/y")])
def test_os_errors_end_in_one_error_line(err, capsys):
    def fail(args):
        raise err

    assert run_command(fail, None) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and err.strerror in lines[0]


# ------------------------------------------------------------------------------------------- checkpoints

class _Payload:
    """Unpickling this calls ``exec``: it writes the marker file (the attack the loader must refuse)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def _tiny_entry_and_state():
    from kernel.models import build_model
    from kernel.demo.weights import deterministic_state_dict, original_layout, preset_entries

    entry = preset_entries("tiny")[-1]  # a small EfficientNet
    return entry, deterministic_state_dict(original_layout(build_model(entry)))


def test_malicious_pickle_with_null_sha256_does_not_run(tmp_path):
    import torch

    from kernel.models import CheckpointError, load_model

    entry, sd = _tiny_entry_and_state()
    marker = tmp_path / "pwned"
    torch.save({"model": sd, "config": _Payload(marker)}, tmp_path / entry["checkpoint"])
    (tmp_path / "raw.pth").write_bytes(pickle.dumps(_Payload(marker)))  # a plain pickle, not a torch zip
    for checkpoint in (entry["checkpoint"], "raw.pth"):
        with pytest.raises(CheckpointError, match="unpickling can run code: refused"):
            load_model({**entry, "checkpoint": checkpoint, "sha256": None}, tmp_path)
        assert not marker.exists()


def test_pinned_or_trusted_checkpoint_with_objects_loads(tmp_path, caplog):
    import argparse

    import torch

    from kernel.models import CheckpointError, load_model, sha256_file
    from kernel.models.checkpoint import trust_all_checkpoints

    entry, sd = _tiny_entry_and_state()
    path = tmp_path / entry["checkpoint"]
    torch.save({"model": sd, "args": argparse.Namespace(lr=0.1)}, path)
    load_model({**entry, "sha256": sha256_file(path)}, tmp_path)  # pinned: the user vouched for this file
    with pytest.raises(CheckpointError, match="refused"):
        load_model({**entry, "sha256": None}, tmp_path)
    trust_all_checkpoints(True)
    try:
        with caplog.at_level("WARNING"):
            load_model({**entry, "sha256": None}, tmp_path)
        assert "--trust-checkpoint" in caplog.text
    finally:
        trust_all_checkpoints(False)


def test_unpinned_checkpoint_logs_that_only_shapes_were_checked(tmp_path, caplog):
    import torch

    from kernel.models import CheckpointError, load_model, sha256_file

    entry, sd = _tiny_entry_and_state()
    other = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}  # another model, same shapes
    torch.save({"model": sd}, tmp_path / "mine.pth")
    torch.save({"model": other}, tmp_path / entry["checkpoint"])
    with caplog.at_level("WARNING"):
        load_model({**entry, "sha256": None}, tmp_path)
    assert "only its architecture (keys and shapes) was checked" in caplog.text
    with pytest.raises(CheckpointError, match="wrong or modified file"):
        load_model({**entry, "sha256": sha256_file(tmp_path / "mine.pth")}, tmp_path)


# ------------------------------------------------------------------------------------------- predict

def test_bad_landmark_id_keeps_the_valid_fallback(tmp_path, capsys):
    from kernel.submission import check_submission

    competition(tmp_path, "id,landmark_id\nfff001,7\nfff002,1005.0\n")
    out = tmp_path / "s.csv"
    assert _run(predict_argv(tmp_path, str(out))) == 2
    err = capsys.readouterr().err
    assert "train.csv:3: landmark_id '1005.0'" in err and str(out) + ":" not in err
    assert check_submission("recognition", out, ["abc001", "abd002"])["rows"] == 2  # the fallback, valid
    log = json.loads((tmp_path / "s.log.json").read_text())
    assert log["finished"] is False and log["submissions"] == 1


def test_invalid_candidate_never_replaces_the_previous_submission(tmp_path):
    from kernel.submission import write_submission

    out = tmp_path / "s.csv"
    write_submission("recognition", {}, ["a1", "b2"], out)
    good = out.read_bytes()
    assert (out.stat().st_mode & 0o777) == 0o666 & ~_umask()
    with pytest.raises(KernelError, match="failed its check and keeps the previous file"):
        write_submission("recognition", {"a1": ("abc1005", 0.9)}, ["a1", "b2"], out)
    with pytest.raises(KernelError, match="failed its check"):
        write_submission("retrieval", {"a1": ["i,1"]}, ["a1", "b2"], tmp_path / "r.csv")
    assert out.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv"]  # no temporary left behind


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_undecodable_and_csv_unsafe_names_are_logged_failures_not_tracebacks(tmp_path, capsys, caplog):
    """A non-UTF-8 file name and an id with a comma: skipped (logged), the fallback is written without them,
    and the run goes on to its next clean error (here: the manifest's checkpoint does not exist)."""
    competition(tmp_path, test_ids=("abc001", "ab,c02"))
    bad = os.path.join(os.fsencode(tmp_path / "data" / "test"), b"c", b"a", b"f")
    os.makedirs(bad)
    _jpeg(Path(os.fsdecode(os.path.join(bad, b"caf\xe9.jpg"))))
    out = tmp_path / "s.csv"
    assert _run(predict_argv(tmp_path, str(out))) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "not valid UTF-8" in caplog.text
    assert "checkpoint" in err.splitlines()[-1]
    assert out.read_text() == "id,landmarks\nabc001,\n"
    log = json.loads((tmp_path / "s.log.json").read_text())
    assert "ab,c02" in log["failures"]


def test_folder_symlink_loop_is_walked_once(tmp_path, caplog):
    from kernel.data.sources import kaggle_split

    competition(tmp_path)
    (tmp_path / "data" / "test" / "a" / "loop").symlink_to(tmp_path / "data" / "test")
    with caplog.at_level("WARNING"):
        ids = [r.id for r in kaggle_split(tmp_path / "data", "test")]
    assert ids == ["abc001", "abd002"]
    assert "symbolic link loop" in caplog.text


def test_interrupt_leaves_the_log(tmp_path, monkeypatch, capsys):
    import kernel.extract

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(kernel.extract, "extract", interrupted)
    competition(tmp_path)
    assert _run(predict_argv(tmp_path, str(tmp_path / "s.csv"))) == 130
    log = json.loads((tmp_path / "s.log.json").read_text())
    assert log["finished"] is False and log["decisions"][0].startswith("fallback submission")


# ------------------------------------------------------------------------------------------- images, stores

def test_decompression_bomb_header_is_a_decode_failure(tmp_path):
    from kernel.data.decode import DecodeError, decode_image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (128, 128, 128)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")  # baseline frame header: length(2) precision(1) height(2) width(2)
    data[sof + 5:sof + 9] = (60000).to_bytes(2, "big") * 2
    path = tmp_path / "bomb.jpg"
    path.write_bytes(bytes(data))
    with pytest.raises(DecodeError, match="declared size 60000x60000 exceeds the decompression-bomb limit"):
        decode_image(path, min_side=768)


@pytest.mark.parametrize("emb, needle", [
    ("int8", "dtype int8"), ("zeros", "all zeros"), ("nan", "NaN or infinite")])
def test_descriptor_checks(emb, needle):
    import numpy as np

    from kernel.descriptor_checks import check_descriptors

    arrays = {"int8": np.ones((2, 4), np.int8), "zeros": np.array([[1, 0], [0, 0]], np.float32),
              "nan": np.array([[1, 0], [np.nan, 0]], np.float32)}
    with pytest.raises(KernelError, match=needle):
        check_descriptors(["a", "b"], arrays[emb], "S/m/train.npz")


def test_empty_descriptor_split_warns(caplog):
    import numpy as np

    from kernel.descriptor_checks import check_descriptors

    with caplog.at_level("WARNING"):
        check_descriptors([], np.zeros((0, 4), np.float32), "S/m/train.npz")
    assert "no descriptors" in caplog.text


def test_store_files_have_the_mode_of_any_new_file(tmp_path):
    """Descriptor files, meta.json and prepared artefacts are written like any new file (not 0600)."""
    import numpy as np

    from kernel import store

    path = store.save_split(tmp_path, "m", "train", ["a", "b"], np.eye(2, 4, dtype=np.float16))
    meta = store.write_meta(tmp_path, "m", {"name": "m", "family": "dolg"})
    for p in (path, meta):
        assert (p.stat().st_mode & 0o777) == 0o666 & ~_umask()


def test_trust_checkpoint_holds_for_its_own_command_only():
    # one process, two commands (a notebook calling the CLI twice): the second, without the flag, trusts nothing
    from types import SimpleNamespace

    from kernel.cli import run_command
    from kernel.models import checkpoint

    seen = []
    run_command(lambda a: seen.append(checkpoint._TRUST_ALL), SimpleNamespace(trust_checkpoint=True), quiet=True)
    run_command(lambda a: seen.append(checkpoint._TRUST_ALL), SimpleNamespace(trust_checkpoint=False), quiet=True)
    run_command(lambda a: seen.append(checkpoint._TRUST_ALL), SimpleNamespace(), quiet=True)
    assert seen == [True, False, False]
