"""The plan after the probe counts one-time costs (device start-up, model loading, warm-up) once per extraction
call, not once per image: measured apart where they happen (extraction), projected apart (kernel.plan). No test
here reads the wall clock for a number it asserts: the plan is fed recorded probe timings, the runner a stand-in
clock."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from kernel.budget import plan_models
from kernel.demo.weights import REPO_MANIFEST
from kernel.models import load_manifest, select
from kernel.plan import Probe, plan_after_probe, project
from kernel.predict import chunk_ends
from kernel.predict_report import PredictReport

# ms per image on one T4 (the `profile` projection, README "profile"): the eight recognition models
T4_MS = {"dolg_effnet_b5_768": 47.7, "dolg_effnet_b6_768": 62.9, "dolg_effnet_b7_448_s1": 121.9,
         "hybrid_b3_swin224_896": 18.6, "hybrid_b5_swin224_448_s1": 28.2, "hybrid_b6_swin384_384": 36.0,
         "effnet_b3_768": 13.8, "effnet_b6_512": 21.4}
PUBLIC_TEST = 10_000
PROBE_IMAGES = 16  # two batches of 8: the second gives the steady rate
LOAD_S, WARMUP_S, STARTUP_S = 54.0 / 8, 0.5, 2.0  # per model, per model, once: a minute of one-time costs
DECODE_S, SETUP_S = 0.01, 0.5  # per image not hidden behind the forwards; the call's checks, planning, merging
BUDGET_S, RESERVE_S, DEVICES = 11.3 * 3600, 1800.0, 2  # the T4 x2


def _entries():
    return select(load_manifest(REPO_MANIFEST), None, "recognition")


def _recorded_probe(test_images: int) -> Probe:
    """A probe of 16 images in one process on one T4, as the extraction summary records it: forwards at the T4
    rates plus each model's first-batch warm-up, the loading, the device start-up, the setup."""
    model_s = {m: PROBE_IMAGES * ms / 1000 + WARMUP_S for m, ms in T4_MS.items()}
    loop = sum(model_s.values()) + PROBE_IMAGES * DECODE_S
    later = sum(1 for end in chunk_ends(PROBE_IMAGES, test_images, 4, 256) if end > PROBE_IMAGES)
    return Probe(test=list(range(test_images)), size=PROBE_IMAGES, resumed=0,
                 seconds=loop + 8 * LOAD_S + STARTUP_S + SETUP_S, model_seconds=model_s,
                 computed={m: PROBE_IMAGES for m in T4_MS}, warmup_seconds={m: WARMUP_S for m in T4_MS},
                 load_seconds={m: LOAD_S for m in T4_MS}, startup_seconds=STARTUP_S, loop_seconds=loop,
                 test_calls=later)


def _projected(p) -> float:
    return sum(p.costs.values()) + p.fixed


def _old_formula(measured: Probe, entries) -> tuple[dict, float]:
    """The projection before this change: everything beyond the forwards, per new probe image, times every image."""
    per_image = {e["name"]: measured.model_seconds[e["name"]] / measured.computed[e["name"]] / DEVICES
                 for e in entries}
    overhead = (measured.seconds - sum(measured.model_seconds.values())) / (measured.size - measured.resumed)
    remaining = len(measured.test) - measured.size
    return {n: r * remaining for n, r in per_image.items()}, overhead * remaining + RESERVE_S


def test_a_hidden_test_set_three_times_the_public_one_keeps_every_model():
    entries = _entries()
    hidden = _recorded_probe(3 * PUBLIC_TEST)
    report = PredictReport(track="recognition", out="s.csv", test_images=3 * PUBLIC_TEST)
    kept = plan_after_probe(hidden, entries, {}, {}, DEVICES, BUDGET_S, RESERVE_S, report)
    assert [e["name"] for e in kept] == [e["name"] for e in entries] and report.dropped == []
    # the projection, by hand: the steady rates and the decoding per image left, the one-time costs per later call
    left, calls = 3 * PUBLIC_TEST - PROBE_IMAGES, 4
    per_image = sum(T4_MS.values()) / 1000 / DEVICES + DECODE_S
    once_per_call = 8 * (LOAD_S + WARMUP_S) + SETUP_S + STARTUP_S  # two devices: each call starts its workers
    p = project(hidden, entries, {}, {}, DEVICES, RESERVE_S)
    assert _projected(p) == pytest.approx(left * per_image + calls * once_per_call + RESERVE_S)
    assert _projected(p) < BUDGET_S / 5
    # the same per-image speed on the public size: the hidden set adds per-image time only
    public = project(_recorded_probe(PUBLIC_TEST), entries, {}, {}, DEVICES, RESERVE_S)
    assert _projected(p) - _projected(public) == pytest.approx(2 * PUBLIC_TEST * per_image)
    # the decision line says what the one-time costs were
    assert ("one-time: device start-up 2.0 s, model loading 54.0 s, warm-up 4.0 s, other setup 0.5 s; counted again "
            "for each of 4 later extraction calls (up to 60.5 s each), not per image") in report.decisions[0]


def test_control_the_old_formula_kept_one_model_on_the_same_numbers():
    entries = _entries()
    hidden = _recorded_probe(3 * PUBLIC_TEST)
    costs, fixed = _old_formula(hidden, entries)
    assert fixed > BUDGET_S  # a minute of loading became 3.5 s for each of the 29,984 images left
    old = plan_models(costs, {e["name"]: e["priority"] for e in entries}, BUDGET_S, fixed_s=fixed)
    assert old.kept == ["dolg_effnet_b5_768"] and len(old.dropped) == 7
    assert old.projected_s > 2 * BUDGET_S > 10 * _projected(project(hidden, entries, {}, {}, DEVICES, RESERVE_S))


def test_every_later_extraction_call_loads_its_models_again():
    # a train split two models lack is one more call for those two: their loading and warm-up once more, not per image
    entries = _entries()
    measured = _recorded_probe(3 * PUBLIC_TEST)
    lacking = {"dolg_effnet_b5_768": ["train"], "effnet_b3_768": ["train"]}
    base = project(measured, entries, {"train": 0}, {}, DEVICES, RESERVE_S)
    more = project(measured, entries, {"train": 1000}, lacking, DEVICES, RESERVE_S)
    assert more.calls == {e["name"]: 4 + (e["name"] in lacking) for e in entries}
    for name in lacking:
        rate = T4_MS[name] / 1000 / DEVICES
        assert more.costs[name] - base.costs[name] == pytest.approx(1000 * rate + LOAD_S + WARMUP_S)
    assert more.fixed - base.fixed == pytest.approx(1000 * DECODE_S + SETUP_S + STARTUP_S)
    # one device: the process keeps its CUDA context, so the start-up is not paid again
    single = project(measured, entries, {}, {}, 1, RESERVE_S)
    assert single.setup == pytest.approx(SETUP_S)


def test_a_probe_without_the_new_measurements_projects_as_before():
    entries = [{"name": n, "priority": p} for n, p in (("a", 1), ("b", 2))]
    measured = Probe(test=list(range(100)), size=10, resumed=0, seconds=3.5, model_seconds={"a": 1.0, "b": 2.0},
                     computed={"a": 10, "b": 10})
    p = project(measured, entries, {}, {}, 1, 0.0)
    assert p.overhead == pytest.approx(0.05) and p.setup == 0.0 and p.per_call == {"a": 0.0, "b": 0.0}
    assert _projected(p) == pytest.approx(90 * (0.1 + 0.2 + 0.05))


# ------------------------------------------------------------------------------------- measured where they happen

class _Clock:
    """A stand-in for ``time.perf_counter``: it moves only when the fake model runs."""

    def __init__(self):
        self.t = 100.0

    def perf_counter(self) -> float:
        return self.t


class _SlowFirstModel(torch.nn.Module):
    def __init__(self, clock: _Clock, first_extra: float, per_item: float):
        super().__init__()
        self.clock, self.first_extra, self.per_item, self.forwards = clock, first_extra, per_item, 0

    def forward(self, x):
        self.clock.t += self.per_item * len(x) + (self.first_extra if self.forwards == 0 else 0.0)
        self.forwards += 1
        return torch.ones(len(x), 4)


def test_the_runner_sets_its_first_batch_warm_up_apart(monkeypatch):
    import kernel.extract.runner as runner_mod

    clock = _Clock()
    monkeypatch.setattr(runner_mod, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    r = runner_mod.ModelRunner(_SlowFirstModel(clock, first_extra=2.0, per_item=0.1), "m", "cpu", batch_size=4)
    r(torch.zeros(8, 3, 2, 2))  # two sub-batches; the first forward pays the warm-up
    assert r.warmup_seconds == 0.0 and r.seconds == pytest.approx(2.8)  # one call: no steady rate to compare with
    r(torch.zeros(8, 3, 2, 2))
    r(torch.zeros(4, 3, 2, 2))
    assert r.seconds == pytest.approx(2.8 + 0.8 + 0.4) and r.items == 20
    assert r.warmup_seconds == pytest.approx(2.0)
    assert (r.seconds - r.warmup_seconds) / r.items == pytest.approx(0.1)  # the steady rate the plan uses


def test_merged_worker_summaries_count_parallel_one_time_costs_once():
    from kernel.extract import ExtractSummary
    from kernel.multidevice import merge_summaries

    def worker(load, startup, warm):
        return ExtractSummary("test", 4, ["m"], computed={"m": 4}, model_seconds={"m": 1.0},
                              warmup_seconds={"m": warm}, load_seconds={"m": load}, startup_seconds=startup,
                              loop_seconds=2.0)

    total = ExtractSummary("test", 8, ["m"])
    assert merge_summaries(total, {0: worker(5.0, 1.0, 0.2), 1: worker(6.0, 1.5, 0.3)}, ["cuda:0", "cuda:1"]) == []
    assert total.load_seconds == {"m": 6.0} and total.startup_seconds == 1.5 and total.loop_seconds == 2.0
    assert total.model_seconds == {"m": 2.0} and total.warmup_seconds == {"m": pytest.approx(0.5)}


def test_an_extraction_reports_its_one_time_costs_apart(tiny_weights, tmp_path):
    from kernel.data.sources import folder_source
    from kernel.demo import SAMPLE_DIR
    from kernel.extract import extract

    records = folder_source(SAMPLE_DIR)[:8]
    names = ["effnet_b6_512", "hybrid_b3_swin224_896"]
    entries = select(load_manifest(tiny_weights[1]), ",".join(names))
    s = extract(entries, tiny_weights[0], records, "test", tmp_path / "store", device="cpu", batch_size=4,
                workers=0, progress=False)
    assert s.complete and s.computed == {n: 8 for n in names}
    assert set(s.load_seconds) == set(names) and all(v > 0 for v in s.load_seconds.values())
    assert s.startup_seconds == 0.0  # the CPU has nothing to start
    assert all(0.0 <= s.warmup_seconds[n] <= s.model_seconds[n] for n in names)  # two batches: set apart
    assert sum(s.model_seconds.values()) <= s.loop_seconds
    assert s.loop_seconds + sum(s.load_seconds.values()) <= s.seconds
    assert math.isfinite(s.seconds)
