"""``python -m kernel postprocess`` and ``validate`` end to end on small synthetic stores, and bad input."""
import json

import numpy as np
import pytest

from kernel import metrics, search, store, submission
from tests import synthetic
from kernel.cli import main
from kernel.postprocess import pipeline

MODELS = ["dolg_effnet_b5_768", "hybrid_b3_swin224_896", "effnet_b6_512"]
SMALL = dict(
    n_landmarks=60, train_max=10, n_bank=100, index_landmarks=30, index_per_landmark=3, index_distractors=100,
    retrieval_queries=40, retrieval_nonlandmark_queries=10, recognition_queries=40, recognition_nonlandmark_queries=40,
)


@pytest.fixture(scope="module")
def world():
    return synthetic.generate(synthetic.SyntheticConfig(seed=7, **SMALL))


@pytest.fixture
def retrieval(world, tmp_path):
    return synthetic.write_store(world, tmp_path, "retrieval", models=MODELS)


@pytest.fixture
def recognition(world, tmp_path):
    return synthetic.write_store(world, tmp_path, "recognition", models=MODELS)


def run(capsys, *argv):
    code = main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return code, out, err


def postprocess(capsys, paths, track, out, *extra):
    return run(capsys, "postprocess", "--track", track, "--store", paths["store"], "--train-labels",
               paths["train_labels"], "--out", out, "--no-progress", *extra)


@pytest.mark.parametrize("rerank", ["soft", "two-stage", "none"])
def test_retrieval_postprocess_then_validate(capsys, retrieval, tmp_path, rerank):
    out = tmp_path / "submission.csv"
    code, stdout, err = postprocess(capsys, retrieval, "retrieval", out, "--rerank", rerank)
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["rows"] == 50
    code, stdout, err = run(capsys, "validate", "--track", "retrieval", "--submission", out,
                            "--solution", retrieval["solution"])
    assert code == 0, err
    result = json.loads(stdout.strip().splitlines()[-1])
    sol = metrics.read_solution(retrieval["solution"], "retrieval")
    preds = submission.read_submission("retrieval", out)
    assert result["score"] == pytest.approx(metrics.map_at_k(preds, {**sol["Public"], **sol["Private"]}))
    assert result["metric"] == "mAP@100" and result["score"] > 0.3
    assert result["scored"] == 40 and result["ignored"] == 10


@pytest.mark.parametrize("track", ["retrieval", "recognition"])
def test_search_prefilter_gives_the_same_submission(capsys, retrieval, recognition, tmp_path, track, monkeypatch):
    # two runs in one process: each run's --search-prefilter reaches every search of that run and only
    # that run (bf16 first, so a choice left behind would show in the "off" run)
    paths = retrieval if track == "retrieval" else recognition
    seen, bf16_loops = [], []
    real_topk, real_loop = search.topk, search.search_blocks_bf16
    monkeypatch.setattr(search, "topk", lambda *a, **kw: seen.append(kw["prefilter"]) or real_topk(*a, **kw))
    monkeypatch.setattr(search, "search_blocks_bf16", lambda *a: bf16_loops.append(1) or real_loop(*a))
    files = {}
    for mode in ("bf16", "off"):
        seen.clear(), bf16_loops.clear()
        files[mode] = tmp_path / f"{mode}.csv"
        # the prefilter is a CPU feature: on a GPU machine the search would not run it at all
        code, _, err = postprocess(capsys, paths, track, files[mode], "--search-prefilter", mode, "--device", "cpu")
        assert code == 0, err
        assert seen and set(seen) == {mode}
        assert bool(bf16_loops) == (mode == "bf16")  # the plain searches (k-NN labels, the bank) ran it
    off, bf16 = (submission.read_submission(track, files[m]) for m in ("off", "bf16"))
    assert off.keys() == bf16.keys()
    if track == "retrieval":
        assert off == bf16
    else:  # same labels; confidences from float32 sums that differ only in rounding
        for key, pred in off.items():
            assert (pred is None) == (bf16[key] is None)
            if pred is not None:
                assert pred[0] == bf16[key][0] and pred[1] == pytest.approx(bf16[key][1], abs=1e-5)


def test_recognition_with_broken_image_and_partial_model(capsys, recognition, tmp_path):
    st = recognition["store"]
    # an image nobody could decode, and a model that dropped part-way (misses 5 test images)
    store.write_failures(st, "test", {"ffffffffffffffff": "cannot decode"})
    ids, emb = store.load_split(st, MODELS[0], "test")
    store.save_split(st, MODELS[0], "test", ids[5:], emb[5:])
    with open(recognition["solution"], "a") as fh:
        fh.write("ffffffffffffffff,,Private\n")
    out = tmp_path / "submission.csv"
    code, stdout, err = postprocess(capsys, recognition, "recognition", out)
    assert code == 0, err
    preds = submission.read_submission("recognition", out)
    assert preds["ffffffffffffffff"] is None
    assert all(preds[i] is not None for i in ids)  # the 5 images are answered by the other models
    code, stdout, err = run(capsys, "validate", "--track", "recognition", "--submission", out,
                            "--solution", recognition["solution"])
    assert code == 0, err
    lines = stdout.strip().splitlines()
    assert "GAP" in stdout and json.loads(lines[-1])["score"] > 0.2
    assert json.loads(lines[-1])["empty"] == 1


def test_constants_from_the_command_line(capsys, retrieval, tmp_path):
    out = tmp_path / "s.csv"
    code, _, err = postprocess(capsys, retrieval, "retrieval", out, "--n-results", 5, "--knn-k", 1,
                               "--models", ",".join(MODELS[:2]))
    assert code == 0, err
    assert max(len(v or []) for v in submission.read_submission("retrieval", out).values()) == 5


def expect_error(capsys, argv, *needles):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err
    for n in needles:
        assert str(n) in err, err
    return err


def test_missing_split_names_the_file(capsys, retrieval, tmp_path):
    path = store.split_path(retrieval["store"], MODELS[1], "index")
    path.unlink()
    expect_error(capsys, ["postprocess", "--track", "retrieval", "--store", retrieval["store"], "--train-labels",
                          retrieval["train_labels"], "--out", tmp_path / "s.csv"], path, "missing split 'index'")
    assert not (tmp_path / "s.csv").exists()


def test_mismatched_ids_wrong_dimension_and_nan(capsys, retrieval, tmp_path):
    st = retrieval["store"]
    argv = ["postprocess", "--track", "retrieval", "--store", st, "--train-labels", retrieval["train_labels"],
            "--out", tmp_path / "s.csv", "--no-progress"]
    ids, emb = store.load_split(st, MODELS[2], "index")
    ids[0] = "not-an-index-id"
    store.save_split(st, MODELS[2], "index", ids, emb)
    expect_error(capsys, argv + ["--rerank", "two-stage"], store.split_path(st, MODELS[2], "index"), "ids do not match")
    ids, emb = store.load_split(st, MODELS[1], "train")
    store.save_split(st, MODELS[1], "train", ids, emb[:, :256])
    expect_error(capsys, argv, store.split_path(st, MODELS[1], "train"), "256-d, expected 512-d")
    ids, emb = store.load_split(st, MODELS[0], "test")
    emb[3] = np.nan
    store.save_split(st, MODELS[0], "test", ids, emb)
    expect_error(capsys, argv, store.split_path(st, MODELS[0], "test"), "NaN")


def test_bad_train_labels_and_unknown_model(capsys, retrieval, tmp_path):
    st = retrieval["store"]
    labels = tmp_path / "labels.csv"
    lines = retrieval["train_labels"].read_text().splitlines()
    labels.write_text("\n".join(lines[:-1]) + "\n")  # the last train image has no label
    argv = ["postprocess", "--track", "retrieval", "--store", st, "--out", tmp_path / "s.csv", "--no-progress"]
    expect_error(capsys, argv + ["--train-labels", labels], "train.npz", "no landmark_id", lines[-1].split(",")[0])
    labels.write_text("image,landmark\na,1\n")
    expect_error(capsys, argv + ["--train-labels", labels], labels, "column 'id' is missing")
    expect_error(capsys, argv + ["--train-labels", tmp_path / "nope.csv"], "nope.csv", "not found")
    expect_error(capsys, argv + ["--train-labels", labels, "--models", "resnet_9000"], st, "resnet_9000")
    expect_error(capsys, argv[:3] + ["--store", tmp_path / "nostore", "--out", tmp_path / "s.csv",
                                     "--train-labels", labels], "nostore", "not found")


def test_recognition_bank_must_be_complete(capsys, recognition, tmp_path):
    store.split_path(recognition["store"], MODELS[1], "nonlandmark").unlink()
    expect_error(capsys, ["postprocess", "--track", "recognition", "--store", recognition["store"], "--train-labels",
                          recognition["train_labels"], "--out", tmp_path / "s.csv"], "nonlandmark", MODELS[1])
    # without any bank it runs (plain k-NN voting)
    for m in MODELS:
        path = store.split_path(recognition["store"], m, "nonlandmark")
        if path.exists():
            path.unlink()
    code, _, err = postprocess(capsys, recognition, "recognition", tmp_path / "s.csv")
    assert code == 0, err


def test_validate_rejects_incomplete_submission(capsys, retrieval, tmp_path):
    sub = tmp_path / "s.csv"
    sub.write_text("id,images\n" + "\n".join(f"{i}," for i in list(synthetic.generate(
        synthetic.SyntheticConfig(seed=7, **SMALL)).retrieval_test.ids)[:-1]) + "\n")
    expect_error(capsys, ["validate", "--track", "retrieval", "--submission", sub, "--solution",
                          retrieval["solution"]], sub, "1 test ids missing")
    expect_error(capsys, ["validate", "--track", "recognition", "--submission", sub, "--solution",
                          retrieval["solution"]], "column 'landmarks' is missing")


def test_models_of_the_other_track_are_skipped(capsys, retrieval, tmp_path):
    # a recognition-only model in the store (no retrieval splits at all) is not used by default
    store.write_meta(retrieval["store"], "effnet_b3_768", {"name": "effnet_b3_768", "family": "effnet",
                                                          "tracks": ["recognition"]})
    code, _, err = postprocess(capsys, retrieval, "retrieval", tmp_path / "s.csv", "--rerank", "none")
    assert code == 0, err
    # naming it explicitly uses it, and its missing split is reported
    expect_error(capsys, ["postprocess", "--track", "retrieval", "--store", retrieval["store"], "--train-labels",
                          retrieval["train_labels"], "--out", tmp_path / "s.csv", "--models", "effnet_b3_768"],
                 "effnet_b3_768", "missing split 'test'")


def _printed(stdout: str, out, preds: dict) -> None:
    """What ``postprocess`` prints for a submission of ``preds`` written to ``out``."""
    lines = stdout.strip().splitlines()
    n, predicted = len(preds), sum(1 for v in preds.values() if v)
    assert lines[-2] == f"wrote {out}: {n} rows, {predicted} with a prediction, {n - predicted} empty"
    summary = json.loads(lines[-1])
    assert (summary["rows"], summary["predicted"], summary["empty"]) == (n, predicted, n - predicted)


@pytest.mark.parametrize("track,flags,api", [
    ("recognition", ["--no-renormalize"], dict(renormalize=False)),
    ("retrieval", ["--rerank", "two-stage", "--conf-divisor", 1], dict(rerank="two-stage", conf_divisor=1.0)),
])
def test_our_readings_are_parameters(capsys, recognition, retrieval, tmp_path, track, flags, api):
    # each flag reaches the pipeline: the submission is the API's answer under that reading (which differs
    # from the default reading's), and the command prints what it wrote
    paths = recognition if track == "recognition" else retrieval
    out = tmp_path / "s.csv"
    code, stdout, err = postprocess(capsys, paths, track, out, *flags)
    assert code == 0, err
    run_api = pipeline.recognition_from_store if track == "recognition" else pipeline.retrieval_from_store
    want = run_api(paths["store"], paths["train_labels"], progress=False, **api)
    default = run_api(paths["store"], paths["train_labels"], progress=False,
                      **{k: v for k, v in api.items() if k == "rerank"})  # the same re-ranking, default readings
    got = submission.read_submission(track, out)
    if track == "retrieval":
        want, default = ({q: v or None for q, v in p.items()} for p in (want, default))
    assert got == want and got != default
    _printed(stdout, out, want)
