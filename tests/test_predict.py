"""`predict`: a valid submission whatever happens (broken images, a hopeless deadline, SIGKILL)."""
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from kernel.demo.competition import make_competition, sample_photos
from kernel.predict import PredictOptions, predict
from kernel.submission import check_submission
from tests.conftest import ROOT

# one model per family keeps these tests quick; the dry-run test covers all nine
MODELS = "dolg_effnet_b5_768,hybrid_b6_swin384_384,effnet_b6_512"


@pytest.fixture(scope="module")
def competition(tmp_path_factory):
    return make_competition(tmp_path_factory.mktemp("comp"), seed=3, photos=sample_photos()[:5])


def _test_ids(comp):
    return sorted(pd.read_csv(comp.recognition / "sample_submission.csv", dtype=str)["id"])


def test_predict_extracts_everything_and_keeps_broken_images(competition, tiny_weights, tmp_path):
    weights, manifest = tiny_weights
    out = tmp_path / "submission.csv"
    report = predict(PredictOptions("recognition", competition.recognition, manifest, weights, out, models=MODELS,
                                    nonlandmark=competition.nonlandmark, progress=False, workers=0))
    sub = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert sorted(sub["id"]) == _test_ids(competition)
    assert list(sub.columns) == ["id", "landmarks"]
    broken = competition.broken[0]
    assert sub.set_index("id").loc[broken, "landmarks"] == ""  # unreadable image: its row, empty
    assert broken in report.failures
    assert report.predicted == len(sub) - 1
    assert sorted(report.models) == sorted(MODELS.split(","))
    assert report.submissions >= 2  # the fallback, then real ones
    check_submission("recognition", out, _test_ids(competition))
    log = json.loads((tmp_path / "submission.log.json").read_text())
    assert any("fallback submission" in d for d in log["decisions"])


def test_retrieval_with_precomputed_store(competition, tiny_weights, tmp_path):
    from kernel.data.sources import kaggle_split
    from kernel.extract import extract
    from kernel.models import load_manifest, select

    weights, manifest = tiny_weights
    entries = select(load_manifest(manifest), MODELS, "retrieval")
    store = tmp_path / "store"
    extract(entries, weights, kaggle_split(competition.recognition, "train"), "train", store, progress=False, workers=0)
    extract(entries, weights, kaggle_split(competition.retrieval, "index"), "index", store, progress=False, workers=0)
    out = tmp_path / "retrieval.csv"
    report = predict(PredictOptions("retrieval", competition.retrieval, manifest, weights, out, store=store,
                                    models=MODELS, train_labels=competition.recognition / "train.csv",
                                    progress=False, workers=0))
    assert any("precomputed index" in d for d in report.decisions)
    sub = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert sorted(sub["id"]) == _test_ids(competition)
    index_ids = {r.id for r in kaggle_split(competition.retrieval, "index")}
    rows = [r.split() for r in sub["images"] if r]
    assert rows and all(set(r) <= index_ids and len(r) == len(set(r)) and len(r) <= 100 for r in rows)


def test_descriptors_of_another_checkpoint_are_refused(competition, tiny_weights, tmp_path):
    from kernel import store as kstore
    from kernel.errors import KernelError

    weights, manifest = tiny_weights
    store = tmp_path / "store"
    kstore.save_split(store, "effnet_b6_512", "train", ["a"], [[1.0] + [0.0] * 511])
    kstore.write_meta(store, "effnet_b6_512", {"name": "effnet_b6_512", "family": "effnet", "sha256": "f" * 64})
    with pytest.raises(KernelError, match="do not belong together"):
        predict(PredictOptions("recognition", competition.recognition, manifest, weights, tmp_path / "s.csv",
                               store=store, models="effnet_b6_512", progress=False, workers=0))
    # the fallback was written before the problem was found
    check_submission("recognition", tmp_path / "s.csv", _test_ids(competition))


def test_hopeless_deadline_still_leaves_a_valid_submission_and_says_what_it_dropped(competition, tiny_weights, tmp_path):
    weights, manifest = tiny_weights
    out = tmp_path / "submission.csv"
    # 3.6 microseconds: spent before the probe ends on any machine (the fallback alone is an fsync), so the plan
    # always sees a negative budget, however fast the extraction
    report = predict(PredictOptions("recognition", competition.recognition, manifest, weights, out, models=MODELS,
                                    deadline_hours=1e-9, reserve_minutes=0, progress=False, workers=0,
                                    probe_images=4))
    check_submission("recognition", out, _test_ids(competition))
    assert len(report.dropped) == 2  # the most valuable model is always kept
    drops = [d for d in report.decisions if d.startswith("drop ")]
    assert len(drops) == 2 and all("projected" in d and "> budget" in d for d in drops)
    assert "dolg_effnet_b5_768" not in report.dropped  # priority 1
    assert any(d.startswith("deadline reserve reached") for d in report.decisions)


# Run by the child of the SIGKILL test: `python -m kernel predict ...` that stops for good at a chosen point of
# the run and touches a marker file there, so the test's SIGKILL lands at that point however fast the machine.
_STALLING_PREDICT = """
import sys, time
from pathlib import Path
import kernel.extract, kernel.submission
from kernel.cli import main

marker, point = Path(sys.argv[1]), sys.argv[2]

def stall():
    marker.touch()
    time.sleep(600)

if point == "after the probe":  # the probe's descriptors are stored; the file on disk is the fallback
    real_extract = kernel.extract.extract
    def extract(*args, **kwargs):
        real_extract(*args, **kwargs)
        stall()
    kernel.extract.extract = extract
else:  # "mid-replacement": a better submission is in its temporary file, not renamed over the fallback yet
    real_write = kernel.submission.atomic_write
    def atomic_write(path, write, check=None):
        if not Path(path).exists():
            return real_write(path, write, check)
        def write_then_stall(fh):
            write(fh)
            fh.flush()
            stall()
        return real_write(path, write_then_stall, check)
    kernel.submission.atomic_write = atomic_write
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("point", ["after the probe", "mid-replacement"])
def test_sigkill_mid_run_leaves_a_valid_file(competition, tiny_weights, tmp_path, point):
    weights, manifest = tiny_weights
    out, marker = tmp_path / "submission.csv", tmp_path / "stalled"
    cmd = [sys.executable, "-c", _STALLING_PREDICT, str(marker), point, "predict", "--track", "recognition",
           "--data", str(competition.recognition), "--manifest", str(manifest), "--weights", str(weights),
           "--out", str(out), "--no-progress", "--workers", "0", "--chunks", "8", "--min-chunk", "1",
           "--probe-images", "2"]
    with open(tmp_path / "stderr", "wb") as err:  # a file, not a pipe: a full pipe would block the child
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
    t0 = time.monotonic()
    while not marker.exists() and proc.poll() is None and time.monotonic() - t0 < 600:
        time.sleep(0.05)
    reached = marker.exists()
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert reached, f"the run never reached '{point}': {(tmp_path / 'stderr').read_text()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    check_submission("recognition", out, _test_ids(competition))
    assert set(pd.read_csv(out, dtype=str, keep_default_na=False)["landmarks"]) == {""}  # still the fallback
    if point == "mid-replacement":  # the candidate was complete on disk, but never replaced the fallback
        assert list(tmp_path.glob(".submission.csv.*.tmp"))


@pytest.mark.slow
def test_bad_competition_folder_is_one_clear_message(tmp_path, tiny_weights):
    weights, manifest = tiny_weights
    r = subprocess.run([sys.executable, "-m", "kernel", "predict", "--track", "recognition", "--data",
                        str(tmp_path / "nope"), "--manifest", str(manifest), "--weights", str(weights), "--out",
                        str(tmp_path / "s.csv")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "nope" in r.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_index_labels_computed_once_not_per_chunk(competition, tiny_weights, tmp_path, caplog):
    """Retrieval in several chunks: each model's index k-NN labels are computed by the first
    post-processing, kept in the working store's prepared/ and used by every later one."""
    import logging

    from kernel.data.sources import kaggle_split
    from kernel.extract import extract
    from kernel.models import load_manifest, select

    weights, manifest = tiny_weights
    entries = select(load_manifest(manifest), MODELS, "retrieval")
    store = tmp_path / "store"
    extract(entries, weights, kaggle_split(competition.recognition, "train"), "train", store, progress=False, workers=0)
    out = tmp_path / "retrieval.csv"
    with caplog.at_level(logging.INFO):
        report = predict(PredictOptions("retrieval", competition.retrieval, manifest, weights, out, store=store,
                                        models=MODELS, train_labels=competition.recognition / "train.csv",
                                        progress=False, workers=0, chunks=3, min_chunk=1, probe_images=2))
    posts = report.submissions - 1  # post-processings (the first submission is the fallback)
    assert posts >= 2
    messages = [r.getMessage() for r in caplog.records]
    names = [e["name"] for e in entries]
    for n in names:
        assert sum(m.endswith(f"prepared/retrieval_{n}.npz") and m.startswith("wrote prepared") for m in messages) == 1
        assert sum(m.endswith(f"prepared/retrieval_{n}.npz") and m.startswith("using prepared") for m in messages) \
            == posts - 1
    assert not any("does not match" in m for m in messages)
