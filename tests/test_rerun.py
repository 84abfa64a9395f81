"""The scored rerun: a competition folder whose reference images differ from the shipped store's (new landmarks
with their images, shipped ids gone, extra index images) and whose test set is three times the public one.
``predict`` decides per image: it extracts the images nobody shipped, leaves out those gone, and answers the test
images of the new landmarks with them."""
import errno

import numpy as np
import pandas as pd
import pytest

from kernel import store as kstore
from kernel.errors import KernelError
from kernel.predict import PredictOptions, predict
from kernel.rerun import make_rerun
from kernel.submission import check_submission

pytestmark = pytest.mark.slow  # end-to-end: extraction and post-processing on the sample competition

MODELS = ["dolg_effnet_b5_768", "hybrid_b6_swin384_384"]  # serve both tracks, two families


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, tiny_weights):
    """The public sample competition and the store a bundle ships for it (train, bank, index)."""
    from kernel.data.sources import folder_source, kaggle_split
    from kernel.demo.competition import make_competition
    from kernel.extract import extract
    from kernel.models import load_manifest, select

    root = tmp_path_factory.mktemp("public")
    comp = make_competition(root / "competition", seed=4)
    weights, manifest = tiny_weights
    entries = select(load_manifest(manifest), MODELS)
    store = root / "store"
    kw = dict(progress=False, workers=0)
    extract(entries, weights, kaggle_split(comp.recognition, "train"), "train", store, **kw)
    extract(entries, weights, folder_source(comp.nonlandmark), "nonlandmark", store, **kw)
    extract(entries, weights, kaggle_split(comp.retrieval, "index"), "index", store, **kw)
    return comp, store


def _predict(track, data, tiny_weights, store, tmp_path, **kw):
    weights, manifest = tiny_weights
    out = tmp_path / "out" / "submission.csv"
    opts = PredictOptions(track, data, manifest, weights, out, store=store, models=",".join(MODELS),
                          work=tmp_path / "work", progress=False, workers=0, **kw)
    return predict(opts), out


def test_recognition_rerun_with_new_landmarks_and_gone_ids(shipped, tiny_weights, tmp_path):
    comp, store = shipped
    info = make_rerun(comp.recognition, tmp_path / "rerun", "recognition", test_factor=3, seed=1)
    public_test = len(pd.read_csv(comp.recognition / "sample_submission.csv"))
    assert info["test_images"] == 3 * public_test + len(info["known_answers"])
    report, out = _predict("recognition", tmp_path / "rerun", tiny_weights, store, tmp_path)
    for m in MODELS:  # every model: the new images extracted here, the gone ones left out
        cov = report.coverage["train"][m]
        assert cov["added"] == cov["extracted"] == len(info["added_train"]) > 0
        assert cov["gone"] == len(info["gone_train"]) and cov["used"] == cov["shipped"] - cov["gone"]
        assert kstore.read_ids(kstore.split_path(tmp_path / "work", m, "train_added")).tolist() == info["added_train"]
    sub = pd.read_csv(out, dtype=str, keep_default_na=False).set_index("id")["landmarks"]
    assert len(sub) == info["test_images"]
    check_submission("recognition", out, list(sub.index))
    for test_id, new_landmark in info["known_answers"].items():  # a copy of a new landmark's train image
        assert sub[test_id].split()[0] == new_landmark, (test_id, sub[test_id])
    renamed = set(info["new_landmarks"].values())  # the public landmark whose images became the new one
    assert not any(p.split()[0] in renamed for p in sub if p)
    assert any("present, not shipped" in d for d in report.decisions)


def test_retrieval_rerun_returns_index_images_nobody_shipped(shipped, tiny_weights, tmp_path):
    comp, store = shipped
    info = make_rerun(comp.retrieval, tmp_path / "rerun", "retrieval", test_factor=3, seed=2)
    report, out = _predict("retrieval", tmp_path / "rerun", tiny_weights, store, tmp_path,
                           train_labels=comp.recognition / "train.csv")
    for m in MODELS:
        cov = report.coverage["index"][m]
        assert cov["added"] == cov["extracted"] == len(info["added_index"]) and cov["gone"] == len(info["gone_index"])
    sub = pd.read_csv(out, dtype=str, keep_default_na=False).set_index("id")["images"]
    answers = {i: a.split() for i, a in sub.items()}
    # a copy of an added index image finds it near the top (the soft re-ranking reorders by landmark consensus,
    # which random demo weights make noisy); before per-image coverage it was never returned at all
    for query, added in info["known_answers"].items():
        assert added in answers[query][:10], (query, answers[query][:10])
    returned = {x for a in answers.values() for x in a}
    assert not returned & set(info["gone_index"])  # removed from the index: never answered


def test_a_full_disk_keeps_the_last_valid_submission(shipped, tiny_weights, tmp_path, monkeypatch, capsys):
    # the disk fills once a better submission was written: the run ends in one line naming the folder and the
    # free bytes, and the submission on disk is the last valid one
    import os

    import kernel.predict as kp
    from kernel.cli import main

    comp, store = shipped
    weights, manifest = tiny_weights
    out = tmp_path / "out" / "submission.csv"
    better, real_better, real_fsync = [], kp.write_better, os.fsync

    def counting(*args):
        real_better(*args)
        better.append(1)

    def fsync(fd):  # the submission's temporary file cannot be flushed any more
        if better and os.readlink(f"/proc/self/fd/{fd}").startswith(str(out.parent / f".{out.name}.")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(kp, "write_better", counting)
    monkeypatch.setattr(os, "fsync", fsync)
    code = main(["predict", "--track", "recognition", "--data", str(comp.recognition), "--manifest", str(manifest),
                 "--weights", str(weights), "--out", str(out), "--store", str(store), "--models", ",".join(MODELS),
                 "--work", str(tmp_path / "work"), "--chunks", "3", "--min-chunk", "4", "--probe-images", "4",
                 "--workers", "0", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(better) == 1
    assert err[-1].startswith(f"error: {out.parent}: no space left on the device (") and "bytes free)" in err[-1]
    assert "Traceback" not in "\n".join(err)
    ids = list(pd.read_csv(comp.recognition / "sample_submission.csv", dtype=str)["id"])
    check_submission("recognition", out, ids)  # the last valid file stands
    assert pd.read_csv(out, dtype=str, keep_default_na=False)["landmarks"].ne("").sum() > 0
    assert not list(out.parent.glob(".submission.csv.*"))  # no temporary file left behind


def test_the_variant_refuses_a_folder_that_is_not_new(shipped, tmp_path):
    comp, _ = shipped
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(KernelError, match="not empty"):
        make_rerun(comp.recognition, tmp_path / "x", "recognition")
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def test_views_read_shipped_rows_in_place(tmp_path):
    # a view without the gone ids and with added rows reads as one split, streamed or in memory, in any order
    from kernel.rows import open_split
    from kernel.views import write_view

    shipped = tmp_path / "shipped"
    rng = np.random.default_rng(0)
    base = rng.standard_normal((6, 8)).astype(np.float32)
    kstore.save_split(shipped, "m", "train", [f"s{i}" for i in range(6)], base)
    work = tmp_path / "work"
    extra = rng.standard_normal((2, 8)).astype(np.float32)
    kstore.save_split(work, "m", "train_added", ["a0", "a1"], extra)
    write_view(work, "m", "train", kstore.split_path(shipped, "m", "train"), exclude={"s1", "s4"},
               added="train_added", added_exclude={"a1"})
    ids, emb = kstore.load_split(work, "m", "train")
    want_ids = ["s0", "s2", "s3", "s5", "a0"]
    want = np.concatenate([base[[0, 2, 3, 5]], extra[:1]])
    assert ids.tolist() == want_ids and np.array_equal(emb, want)
    rows = open_split(work, "m", "train")
    assert rows.ids.tolist() == want_ids and np.array_equal(rows.block(0, 5), want)
    assert np.array_equal(rows.block(2, 5), want[2:5])
    order = ["a0", "s5", "s0", "s3", "s2"]
    aligned = rows.aligned_to(np.asarray(order), "another model")
    assert np.array_equal(aligned.block(0, 5), want[[want_ids.index(i) for i in order]])
    with pytest.raises(KernelError, match="ids do not match"):
        rows.aligned_to(np.asarray(["s0", "s2"]), "another model")


def test_shipped_recognition_artefacts_are_reused_row_by_row(shipped, tiny_weights, tmp_path, caplog):
    # with prepared family descriptors and B(t) shipped, the rows of the images still present are read from them
    # and only the added images' rows are computed: the same submission as computing everything
    import logging
    import shutil

    from kernel.cli import main

    comp, store = shipped
    with_prepared = tmp_path / "store"
    shutil.copytree(store, with_prepared)
    assert main(["prepare", "--store", str(with_prepared), "--train-labels", str(comp.recognition / "train.csv"),
                 "--track", "recognition", "--no-progress"]) == 0
    info = make_rerun(comp.recognition, tmp_path / "rerun", "recognition", test_factor=1, seed=5)
    with caplog.at_level(logging.INFO, logger="kernel.postprocess.rowreuse"):
        _, reused = _predict("recognition", tmp_path / "rerun", tiny_weights, with_prepared, tmp_path / "a")
    n_kept = len(pd.read_csv(tmp_path / "rerun" / "train.csv")) - len(info["added_train"])
    assert f"{n_kept} train rows reused from {with_prepared / 'prepared'}, {len(info['added_train'])} computed" \
        in caplog.text
    _, computed = _predict("recognition", tmp_path / "rerun", tiny_weights, store, tmp_path / "b")
    a = pd.read_csv(reused, dtype=str, keep_default_na=False).set_index("id")["landmarks"].str.split()
    b = pd.read_csv(computed, dtype=str, keep_default_na=False).set_index("id")["landmarks"].str.split()
    assert a.index.equals(b.index)
    for x, y in zip(a, b):
        assert (x[:1] == y[:1]) and (not x or float(x[1]) == pytest.approx(float(y[1]), abs=1e-5))
