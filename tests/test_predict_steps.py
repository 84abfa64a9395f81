"""The steps of `predict`, one at a time: each takes what the step before produced and is checked alone."""
import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from kernel import predict as kp
from kernel import store as kstore
from kernel.errors import KernelError
from kernel.predict import PredictOptions, Probe
from kernel.predict_report import PredictReport
from kernel.submission import check_submission

B5, B6 = "dolg_effnet_b5_768", "effnet_b6_512"  # manifest priorities 1 and 5


@pytest.fixture(scope="module")
def competition(tmp_path_factory):
    from kernel.demo.competition import make_competition, sample_photos

    return make_competition(tmp_path_factory.mktemp("comp"), seed=3, photos=sample_photos()[:5])


def _opts(competition, tiny_weights, out, **kw) -> PredictOptions:
    weights, manifest = tiny_weights
    return PredictOptions("recognition", competition.recognition, manifest, weights, out, progress=False, workers=0,
                          **kw)


def _entries(tiny_weights, names=f"{B5},{B6}"):
    from kernel.models import load_manifest, select

    return select(load_manifest(tiny_weights[1]), names, "recognition")


def _report(out) -> PredictReport:
    return PredictReport(track="recognition", out=str(out), test_images=2)


def _log(out) -> dict:
    return json.loads(kp.log_path(out).read_text())


# ------------------------------------------------------------------------------------------------ options

def test_every_option_is_a_predict_flag(tmp_path):
    from kernel.cli import build_parser

    argv = ["predict", "--track", "retrieval", "--data", "d", "--manifest", "m", "--weights", "w", "--out", "o.csv",
            "--index-store", "ix", "--min-chunk", "3", "--no-progress"]
    args = build_parser(only="predict").parse_args(argv)
    given = {f: getattr(args, f) for f in PredictOptions.__dataclass_fields__ if f != "progress"}
    opts = PredictOptions(**given, progress=not args.no_progress)
    assert (opts.track, opts.index_store, opts.min_chunk, opts.progress) == ("retrieval", "ix", 3, False)
    defaults = PredictOptions("retrieval", "d", "m", "w", "o.csv", index_store="ix", min_chunk=3, progress=False)
    assert opts == defaults  # the flags' defaults are the options' defaults


def test_reserve_defaults_to_five_percent_of_the_budget_at_most_half_an_hour():
    assert PredictOptions("recognition", "d", "m", "w", "o", deadline_hours=1).reserve_s() == pytest.approx(180)
    assert PredictOptions("recognition", "d", "m", "w", "o", deadline_hours=12).reserve_s() == 1800
    assert PredictOptions("recognition", "d", "m", "w", "o", reserve_minutes=0).reserve_s() == 0
    with pytest.raises(KernelError, match="--reserve-minutes must be a number >= 0"):
        PredictOptions("recognition", "d", "m", "w", "o", reserve_minutes=float("nan")).check()
    with pytest.raises(KernelError, match="--track must be recognition or retrieval"):
        PredictOptions("landmarks", "d", "m", "w", "o").check()


# ------------------------------------------------------------------------------- 1. open, fallback, labels

def test_open_run_reads_the_track_and_writes_nothing(competition, tiny_weights, tmp_path):
    out = tmp_path / "sub" / "s.csv"
    entries, test, report = kp.open_run(_opts(competition, tiny_weights, out), started=0.0)
    assert [e["name"] for e in entries] == [e["name"] for e in _entries(tiny_weights, None)]
    assert all("recognition" in e["tracks"] for e in entries) and "effnet_b5_704" not in {e["name"] for e in entries}
    ids = sorted(pd.read_csv(competition.recognition / "sample_submission.csv", dtype=str)["id"])
    assert sorted(r.id for r in test) == ids and report.test_images == len(ids)
    assert not (tmp_path / "sub").exists()


def test_fallback_is_a_valid_empty_submission_and_starts_the_log(tmp_path):
    out = tmp_path / "new" / "folder" / "submission.csv"
    report = _report(out)
    kp.write_fallback("recognition", ["a1", "b2"], out, report)
    assert out.read_text() == "id,landmarks\na1,\nb2,\n"
    assert check_submission("recognition", out, ["a1", "b2"])["empty"] == 2
    log = _log(out)
    assert log["submissions"] == 1 and log["finished"] is False
    assert log["decisions"] == [f"fallback submission (2 rows, empty predictions) written to {out}"]


def test_the_fallback_is_on_disk_before_the_train_labels_are_looked_for(competition, tiny_weights, tmp_path):
    out = tmp_path / "s.csv"
    with pytest.raises(KernelError, match="missing.csv: train labels .* not found"):
        kp.predict(_opts(competition, tiny_weights, out, train_labels=tmp_path / "missing.csv"))
    check_submission("recognition", out, [r for r in pd.read_csv(
        competition.recognition / "sample_submission.csv", dtype=str)["id"]])
    assert _log(out)["submissions"] == 1 and not (tmp_path / "recognition_descriptors").exists()


def test_labels_and_work_default_beside_the_data_and_the_submission(competition, tiny_weights, tmp_path):
    out = tmp_path / "s.csv"
    report = _report(out)
    labels, work = kp.labels_and_work(_opts(competition, tiny_weights, out), report)
    csv = pd.read_csv(competition.recognition / "train.csv", dtype=str)
    assert isinstance(labels, pd.Series) and sorted(labels.index) == sorted(csv["id"])
    assert work == tmp_path / "recognition_descriptors" and work.is_dir()
    assert report.decisions[0].startswith(f"train labels {competition.recognition / 'train.csv'}: ")


# ------------------------------------------------------------------------------ 2. reference descriptors

def _train_ids(competition) -> list[str]:
    return sorted(pd.read_csv(competition.recognition / "train.csv", dtype=str)["id"])


def test_reference_descriptors_link_what_is_precomputed_and_list_the_rest(competition, tiny_weights, tmp_path):
    store, work = tmp_path / "store", tmp_path / "work"
    ids = _train_ids(competition)
    kstore.save_split(store, B6, "train", ids, np.eye(len(ids), 512, dtype=np.float32))
    report = _report(tmp_path / "s.csv")
    opts = _opts(competition, tiny_weights, tmp_path / "s.csv", store=store)
    labels, _ = kp.labels_and_work(opts, report)
    records, missing, added = kp.reference_descriptors(opts, _entries(tiny_weights), work, labels, report)
    # the competition has exactly the shipped images: linked as shipped, nothing to add
    assert kstore.split_path(work, B6, "train").resolve() == kstore.split_path(store, B6, "train").resolve()
    assert added == {} and report.coverage["train"][B6] == {"shipped": len(ids), "present": len(ids),
                                                             "used": len(ids), "added": 0, "gone": 0, "extracted": 0}
    assert missing == {B5: ["train"]}  # no non-landmark split without a folder of them
    assert sorted(r.id for r in records["train"]) == ids
    assert report.decisions[-1] == f"to extract here (not precomputed): {B5}: train"
    assert all((work / n / kstore.META).is_file() for n in (B5, B6))


def test_a_shipped_split_is_used_per_image(competition, tiny_weights, tmp_path):
    # the rerun's folder: two shipped images are gone, two images were added (nobody shipped them)
    from kernel.views import read_view

    store, work = tmp_path / "store", tmp_path / "work"
    ids = _train_ids(competition)
    shipped = ids[2:] + ["gone1", "gone2"]
    kstore.save_split(store, B6, "train", shipped, np.eye(len(shipped), 512, dtype=np.float32))
    report = _report(tmp_path / "s.csv")
    opts = _opts(competition, tiny_weights, tmp_path / "s.csv", store=store, models=B6)
    labels, _ = kp.labels_and_work(opts, report)
    records, missing, added = kp.reference_descriptors(opts, _entries(tiny_weights, B6), work, labels, report)
    assert records == {} and missing == {}
    assert sorted(r.id for r in added["train"][B6]) == ids[:2]
    view = read_view(work, B6, "train")
    assert view.base == kstore.split_path(store, B6, "train").resolve() and view.exclude == {"gone1", "gone2"}
    assert not kstore.split_path(work, B6, "train").exists()  # nothing copied, no link: the view reads in place
    got, emb = kstore.load_split(work, B6, "train")
    assert got.tolist() == ids[2:] and emb.shape == (len(ids) - 2, 512)
    assert report.coverage["train"][B6] == {"shipped": len(shipped), "present": len(ids), "used": len(ids) - 2,
                                            "added": 2, "gone": 2, "extracted": 0}
    # after the test set: the added images are extracted and the view takes them
    assert kp.extract_added(opts, _entries(tiny_weights, B6), added, work, 0.0, 0.0, float("inf"), report)
    got, emb = kstore.load_split(work, B6, "train")
    assert sorted(got.tolist()) == ids and kstore.has_split(work, B6, "train_added")
    assert report.coverage["train"][B6]["extracted"] == 2


# ------------------------------------------------------------------------------------- 3. probe and plan

def test_a_resumed_probe_measures_new_images_after_the_finished_ones(competition, tiny_weights, tmp_path):
    opts = _opts(competition, tiny_weights, tmp_path / "s.csv", probe_images=2, models=B6)
    entries, test, report = kp.open_run(opts, started=0.0)
    work = tmp_path / "work"
    finished = [test[-2].id, test[-1].id]  # kept in test order, ahead of the others
    kstore.save_split(work, B6, "test", finished, np.eye(2, 512, dtype=np.float32))
    measured = kp.probe(opts, entries, test, work, report)
    assert [r.id for r in measured.test[:2]] == finished and len(measured.test) == len(test)
    assert (measured.size, measured.resumed, measured.computed) == (4, 2, {B6: 2})
    assert measured.model_seconds[B6] > 0 and measured.seconds >= measured.model_seconds[B6]
    # the one-time costs apart: loading (and the device start-up) outside the batches, one batch: no warm-up set apart
    assert measured.load_seconds[B6] > 0 and measured.warmup_seconds == {B6: 0.0}
    assert measured.loop_seconds + measured.load_seconds[B6] + measured.startup_seconds <= measured.seconds
    assert measured.test_calls == (1 if len(test) > 4 else 0)  # the chunks after the probe: one, fewer than 256 left
    assert report.decisions == ["resuming: 2 test images already have descriptors from every model"]


def _three_models():
    entries = [{"name": n, "priority": p} for n, p in (("a", 1), ("b", 2), ("c", 3))]
    # 10 new test images: 0.1 / 0.2 / 0.3 s each per model, 0.05 s each of overhead; 90 test images left
    measured = Probe(test=list(range(100)), size=10, resumed=0, seconds=6.5,
                     model_seconds={"a": 1.0, "b": 2.0, "c": 3.0}, computed={"a": 10, "b": 10, "c": 10})
    return entries, measured


def test_plan_drops_the_least_valuable_models_until_the_projection_fits(tmp_path):
    entries, measured = _three_models()
    report = _report(tmp_path / "s.csv")
    # every model also lacks 50 train images: 140 images each, costs 14 / 28 / 42 s;
    # fixed: 0.05 s x 140 images + 10 s reserve = 17 s; 101 s projected > 60 s: c goes, 59 s fits
    kept = kp.plan_after_probe(measured, entries, {"train": 50}, {n: ["train"] for n in "abc"}, devices=1,
                               budget_s=60, reserve_s=10, report=report)
    assert [e["name"] for e in kept] == ["a", "b"] and report.dropped == ["c"]
    assert report.decisions[0] == ("probe: 10 test images in 6.5 s; per model s/image: a 0.100, b 0.200, c 0.300; "
                                   "overhead 0.050 s/image; one-time: device start-up 0.0 s, model loading 0.0 s, "
                                   "warm-up 0.0 s, other setup 0.0 s; counted again for each of 2 later extraction "
                                   "calls (up to 0.0 s each), not per image; projected 59 s for the rest (incl. 10 s "
                                   "reserve) vs 60 s left")
    assert report.decisions[1:] == ["drop c (priority 3): projected 101.0 s > budget 60.0 s; it needs 42.0 s"]


def test_plan_shares_the_extraction_between_devices(tmp_path):
    entries, measured = _three_models()
    kept = kp.plan_after_probe(measured, entries, {"train": 50}, {n: ["train"] for n in "abc"}, devices=2,
                               budget_s=60, reserve_s=10, report=_report(tmp_path / "s.csv"))
    assert [e["name"] for e in kept] == ["a", "b", "c"]  # 7 + 14 + 21 + 17 = 59 s


def test_a_passed_deadline_keeps_only_the_most_valuable_model(tmp_path):
    entries, measured = _three_models()
    report = _report(tmp_path / "s.csv")
    kept = kp.plan_after_probe(measured, entries, {}, {}, devices=1, budget_s=-1, reserve_s=0, report=report)
    assert [e["name"] for e in kept] == ["a"] and report.dropped == ["b", "c"]
    assert report.decisions[-1].startswith("even a projects to")


def test_references_are_extracted_for_the_kept_models_only_and_not_past_the_deadline(competition, tiny_weights,
                                                                                       tmp_path):
    from kernel.data.sources import kaggle_split

    opts, work = _opts(competition, tiny_weights, tmp_path / "s.csv"), tmp_path / "work"
    b5, b6 = _entries(tiny_weights)
    records = {"train": kaggle_split(competition.recognition, "train")[:3]}
    missing = {B5: ["train"], B6: ["train"]}
    report = _report(tmp_path / "s.csv")
    kp.extract_references(opts, [b5, b6], records, missing, work, stop_at=0.0, report=report)
    assert not work.exists() and report.decisions == []
    kp.extract_references(opts, [b5], records, missing, work, stop_at=float("inf"), report=report)
    assert kstore.has_split(work, B5, "train") and not kstore.has_split(work, B6, "train")
    assert report.decisions[0].startswith("extract train: 3 images")


# ---------------------------------------------------------------------------------- 4. chunks, submissions

def test_chunk_ends():
    assert kp.chunk_ends(16, 100, chunks=4, min_chunk=256) == [16, 100]  # too few images for more than one
    assert kp.chunk_ends(16, 1016, chunks=4, min_chunk=256) == [16, 266, 516, 766, 1016]
    assert kp.chunk_ends(2, 10, chunks=8, min_chunk=1) == list(range(2, 11))
    assert kp.chunk_ends(10, 10, chunks=4, min_chunk=1) == [10]  # the probe did everything: one submission


def test_no_test_extraction_once_the_reserve_is_reached(competition, tiny_weights, tmp_path):
    report = _report(tmp_path / "s.csv")
    measured = Probe(test=[SimpleNamespace(id=f"t{i}") for i in range(5)], size=2, resumed=0)
    kp.extract_test_chunk(_opts(competition, tiny_weights, tmp_path / "s.csv"), _entries(tiny_weights), measured,
                          end=5, work=tmp_path / "work", stop_at=0.0, report=report)
    assert report.decisions == ["deadline reserve reached: no more extraction (2 of 5 test images)"]
    assert not (tmp_path / "work").exists()


def test_the_train_labels_are_read_once_for_every_chunk(competition, tiny_weights, tmp_path, monkeypatch):
    # at 1.58 M train images a read costs seconds: the chunks' post-processings share one checked Series
    import kernel.labels

    reads, seen = [], []
    real_read = kernel.labels.read_label_csv
    monkeypatch.setattr(kernel.labels, "read_label_csv", lambda *a, **k: reads.append(a) or real_read(*a, **k))
    monkeypatch.setattr(kp, "extract_test_chunk", lambda *a, **k: None)
    monkeypatch.setattr(kp, "_usable", lambda work, names, track: names)
    monkeypatch.setattr(kp, "_postprocess", lambda opts, work, labels, names, reuse: seen.append(labels) or {})
    monkeypatch.setattr(kp, "write_better", lambda *a, **k: None)
    opts = _opts(competition, tiny_weights, tmp_path / "s.csv", chunks=3, min_chunk=1)
    measured = Probe(test=[SimpleNamespace(id=f"t{i}") for i in range(7)], size=1, resumed=0)
    labels, _ = kp.labels_and_work(opts, _report(tmp_path / "s.csv"))  # the run's one read
    kp.extract_test_in_chunks(opts, _entries(tiny_weights), measured, [f"t{i}" for i in range(7)], tmp_path / "w",
                              labels, float("inf"), _report(tmp_path / "s.csv"))
    assert len(seen) == 4 and all(x is labels for x in seen) and len(reads) == 1
    assert isinstance(seen[0], pd.Series) and len(seen[0]) > 0


def test_a_better_submission_replaces_the_file_and_a_broken_one_keeps_it(tmp_path):
    out = tmp_path / "s.csv"
    report = _report(out)
    kp.write_fallback("recognition", ["a1", "b2"], out, report)
    kp.write_better("recognition", {"a1": ("1005", 0.9)}, ["a1", "b2"], out, [B5], report)
    better = out.read_bytes()
    assert better == b"id,landmarks\na1,1005 0.9\nb2,\n"
    assert (report.submissions, report.models) == (2, [B5])
    assert report.decisions[-1] == f"submission 2: 1/2 test images predicted with {B5}"
    with pytest.raises(KernelError, match="failed its check and keeps the previous file"):
        kp.write_better("recognition", {"a1": ("abc1005", 0.9)}, ["a1", "b2"], out, [B5, B6], report)
    assert out.read_bytes() == better and (report.submissions, report.models) == (2, [B5])
    assert _log(out)["submissions"] == 2


# ----------------------------------------------------------------------------------------------- 5. finish

def test_finish_checks_the_file_on_disk_before_saying_finished(tmp_path):
    out = tmp_path / "s.csv"
    report = _report(out)
    kp.write_fallback("recognition", ["a1", "b2"], out, report)
    with pytest.raises(KernelError, match="1 test ids missing"):
        kp.finish("recognition", out, ["a1", "b2", "c3"], {}, report)
    assert _log(out)["finished"] is False
    kp.finish("recognition", out, ["a1", "b2"], {"a1": ("1005", 0.9), "b2": None}, report)
    log = _log(out)
    assert log["finished"] is True and log["predicted"] == 1


def test_short_time_covers_fewer_added_images_and_says_which(competition, tiny_weights, tmp_path):
    # the test set comes first: with no time left after it, no added image is extracted, the log says how many
    # were left out, and the view keeps the shipped rows only
    import time as _time

    from kernel.references import added_that_fit
    from kernel.views import read_view

    assert added_that_fit(list(range(10)), 2.0, 7.0) == 3 and added_that_fit(list(range(10)), 0.0, 1.0) == 10
    assert added_that_fit(list(range(10)), 2.0, -5.0) == 0
    store, work = tmp_path / "store", tmp_path / "work"
    ids = _train_ids(competition)
    kstore.save_split(store, B6, "train", ids[2:], np.eye(len(ids) - 2, 512, dtype=np.float32))
    report = _report(tmp_path / "s.csv")
    opts = _opts(competition, tiny_weights, tmp_path / "s.csv", store=store, models=B6)
    labels, _ = kp.labels_and_work(opts, report)
    _, _, added = kp.reference_descriptors(opts, _entries(tiny_weights, B6), work, labels, report)
    assert not kp.extract_added(opts, _entries(tiny_weights, B6), added, work, 1.0, 0.0, _time.monotonic(), report)
    assert any(d.startswith("train: 2 images present, not shipped; time left for 0") and "left out: 2" in d
               for d in report.decisions)
    assert read_view(work, B6, "train").added is None and kstore.load_split(work, B6, "train")[0].tolist() == ids[2:]


def test_shipped_descriptors_are_read_in_place_where_links_are_impossible(competition, tiny_weights, tmp_path,
                                                                          monkeypatch):
    import os

    from kernel.views import read_view

    def no_links(*a, **k):
        raise OSError(1, "Operation not permitted")

    store, work = tmp_path / "store", tmp_path / "work"
    ids = _train_ids(competition)
    kstore.save_split(store, B6, "train", ids, np.eye(len(ids), 512, dtype=np.float32))
    monkeypatch.setattr(os, "symlink", no_links)
    report = _report(tmp_path / "s.csv")
    opts = _opts(competition, tiny_weights, tmp_path / "s.csv", store=store, models=B6)
    labels, _ = kp.labels_and_work(opts, report)
    kp.reference_descriptors(opts, _entries(tiny_weights, B6), work, labels, report)
    assert not kstore.split_path(work, B6, "train").exists()  # no copy of the shipped file
    view = read_view(work, B6, "train")
    assert view.base == kstore.split_path(store, B6, "train").resolve() and not view.exclude
    assert kstore.load_split(work, B6, "train")[0].tolist() == ids
    assert f"{B6}: precomputed train from" in report.decisions[-1] and "(view)" in report.decisions[-1]


def test_the_cache_is_skipped_when_the_disk_is_short(tmp_path, monkeypatch, caplog):
    from kernel.postprocess import reference as ref

    reuse = ref.Reuse(dirs=[], cache=tmp_path / "cache")
    monkeypatch.setattr(ref, "has_room", lambda folder, needed: False)
    reuse.save("recognition_bias.npz", lambda: {"kind": "x"}, ["a", "b"], bias=np.zeros(2, np.float32))
    assert not (tmp_path / "cache" / "recognition_bias.npz").exists()
    assert "not cached" in caplog.text
