"""`predict`: a valid submission whatever happens (broken images, a hopeless deadline, SIGKILL)."""
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from kernel.predict import predict
from kernel.demo.competition import make_competition, sample_photos
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
    report = predict("recognition", competition.recognition, manifest, weights, out, models=MODELS,
                     nonlandmark=competition.nonlandmark, progress=False, workers=0)
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
    report = predict("retrieval", competition.retrieval, manifest, weights, out, store=store, models=MODELS,
                     train_labels=competition.recognition / "train.csv", progress=False, workers=0)
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
        predict("recognition", competition.recognition, manifest, weights, tmp_path / "s.csv", store=store,
                models="effnet_b6_512", progress=False, workers=0)
    # the fallback was written before the problem was found
    check_submission("recognition", tmp_path / "s.csv", _test_ids(competition))


def test_hopeless_deadline_still_leaves_a_valid_submission_and_says_what_it_dropped(competition, tiny_weights, tmp_path):
    weights, manifest = tiny_weights
    out = tmp_path / "submission.csv"
    report = predict("recognition", competition.recognition, manifest, weights, out, models=MODELS,
                     deadline_hours=1e-4, reserve_minutes=0, progress=False, workers=0, probe_images=4)
    check_submission("recognition", out, _test_ids(competition))
    assert len(report.dropped) == 2  # the most valuable model is always kept
    drops = [d for d in report.decisions if d.startswith("drop ")]
    assert len(drops) == 2 and all("projected" in d and "> budget" in d for d in drops)
    assert "dolg_effnet_b5_768" not in report.dropped  # priority 1


@pytest.mark.slow
def test_sigkill_mid_run_leaves_a_valid_file(competition, tiny_weights, tmp_path):
    weights, manifest = tiny_weights
    out = tmp_path / "submission.csv"
    cmd = [sys.executable, "-m", "kernel", "predict", "--track", "recognition", "--data", str(competition.recognition),
           "--manifest", str(manifest), "--weights", str(weights), "--out", str(out), "--no-progress",
           "--workers", "0", "--chunks", "8", "--min-chunk", "1", "--probe-images", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    while not out.exists() and time.monotonic() - t0 < 60 and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(1.5)  # mid-way: models loading / extracting
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    check_submission("recognition", out, _test_ids(competition))


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
        report = predict("retrieval", competition.retrieval, manifest, weights, out, store=store, models=MODELS,
                         train_labels=competition.recognition / "train.csv", progress=False, workers=0,
                         chunks=3, min_chunk=1, probe_images=2)
    posts = report.submissions - 1  # post-processings (the first submission is the fallback)
    assert posts >= 2
    messages = [r.getMessage() for r in caplog.records]
    names = [e["name"] for e in entries]
    for n in names:
        assert sum(m.endswith(f"prepared/retrieval_{n}.npz") and m.startswith("wrote prepared") for m in messages) == 1
        assert sum(m.endswith(f"prepared/retrieval_{n}.npz") and m.startswith("using prepared") for m in messages) \
            == posts - 1
    assert not any("does not match" in m for m in messages)
