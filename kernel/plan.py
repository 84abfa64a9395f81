"""Step 3b of ``predict``: project the rest of the run from what the probe measured, and keep the models that fit.

What the probe (:class:`Probe`, from the extraction's :class:`kernel.extract.ExtractSummary`) measured falls in
two kinds, and the projection counts each as often as it really happens:

- **per-image costs**, multiplied by the images still to extract: each model's *steady* forward seconds per
  image (its first batch's warm-up set apart, :attr:`kernel.extract.ModelRunner.warmup_seconds`), divided by the
  devices that share the images, and the *overhead*: the rest of the time spent feeding batches (decoding the
  forwards did not hide, normalising, writing shards), per new probe image;
- **one-time costs**, never multiplied by images: starting the device (the CUDA context), loading each model
  (54 s for the eight full-size recognition models on a 2-core CPU), each model's warm-up, and the call's other
  setup (checks, planning the groups, starting the decoders, merging shards). The probe's own are paid already.
  They recur once per later ``extract`` call, because every call loads its models again and warms them up again
  (``kernel.extract.loop._open_group``): each test chunk after the probe (:func:`kernel.predict.chunk_ends`) and
  each reference split the kept models lack is one call. A model's loading and warm-up belong to its own cost
  (dropping it saves them); the setup belongs to every call. Starting the device recurs only on several devices,
  where each large call starts one worker process per device (:mod:`kernel.multidevice`); one process keeps its
  context. Workers load and warm up at the same time, so a call counts them once.

The old formula put the whole probe's wall time beyond the forwards in the per-image overhead, so a minute of
loading on a 16-image probe became 3.75 s for every image left: on a hidden test set three times the public one,
that alone passed the 12 hours and the plan kept one model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from kernel.budget import plan_models
from kernel.predict_report import PredictReport, decide


@dataclass
class Probe:
    """What the probe (step 3a) measured: the first test images extracted with every model."""

    test: list  # every test record, in extraction order: those an earlier run finished first
    size: int  # test[:size] has descriptors now (the images resumed, then the probe's)
    resumed: int  # test images an earlier run had finished with every model
    seconds: float = 0.0  # wall time of the probe's extraction, in seconds
    model_seconds: dict = field(default_factory=dict)  # model -> seconds in its forward passes (all devices)
    computed: dict = field(default_factory=dict)  # model -> descriptors the probe computed
    warmup_seconds: dict = field(default_factory=dict)  # model -> the part of model_seconds its first batch took
    #   beyond its steady rate (0 when the probe had one batch: then all of it counts per image)
    load_seconds: dict = field(default_factory=dict)  # model -> seconds loading it onto the device
    startup_seconds: float = 0.0  # seconds starting the device (the CUDA context)
    loop_seconds: float | None = None  # wall seconds feeding batches; None (not measured): all of `seconds` but
    #   the loading and the start-up, as if there were no other setup
    test_calls: int | None = None  # extraction calls of the test chunks after the probe; None: one if any remain

    @classmethod
    def from_summary(cls, test: list, size: int, resumed: int, s, test_calls: int) -> "Probe":
        """The probe of ``test[:size]`` from its extraction summary ``s``."""
        return cls(test, size, resumed, s.seconds, dict(s.model_seconds), dict(s.computed), dict(s.warmup_seconds),
                   dict(s.load_seconds), s.startup_seconds, s.loop_seconds, test_calls)


@dataclass
class Projection:
    """The rest of the run, projected from a :class:`Probe` (every figure in seconds)."""

    per_image: dict  # model -> steady forward seconds per image, on all devices together
    overhead: float  # seconds per image beyond the forwards (decoding not hidden, writing)
    per_call: dict  # model -> its loading + warm-up, paid again by every later extraction call it is in
    setup: float  # seconds every later extraction call pays whichever models it holds (start-up included)
    calls: dict  # model -> later extraction calls it takes part in
    costs: dict  # model -> its images x per_image + calls x per_call
    fixed: float  # seconds whichever models are kept: overhead x images, setups, reserve

    def one_time_line(self, measured: Probe) -> str:
        """What the probe's one-time costs were and how often they come back."""
        n_calls = max(self.calls.values(), default=0)
        return (f"one-time: device start-up {measured.startup_seconds:.1f} s, model loading "
                f"{sum(measured.load_seconds.values()):.1f} s, warm-up {sum(measured.warmup_seconds.values()):.1f} s,"
                f" other setup {_setup(measured):.1f} s; counted again for each of {n_calls} later extraction "
                f"calls (up to {sum(self.per_call.values()) + self.setup:.1f} s each), not per image")


def _loop(measured: Probe) -> float:
    if measured.loop_seconds is not None:
        return measured.loop_seconds
    return measured.seconds - sum(measured.load_seconds.values()) - measured.startup_seconds


def _setup(measured: Probe) -> float:
    """The probe call's setup beyond loading and starting the device (checks, planning, decoders, merging)."""
    return max(0.0, measured.seconds - _loop(measured) - sum(measured.load_seconds.values())
               - measured.startup_seconds)


def _rates(measured: Probe, entries: list[dict], devices: int) -> dict:
    """Each measured model's steady forward seconds per image, on ``devices`` devices together."""
    return {e["name"]: (measured.model_seconds[e["name"]] - measured.warmup_seconds.get(e["name"], 0.0))
            / measured.computed[e["name"]] / devices
            for e in entries if measured.computed.get(e["name"])}


def later_calls(measured: Probe, entries: list[dict], references: dict, missing: dict) -> dict:
    """model -> the extraction calls it takes part in after the probe: the test chunks left, and one per
    reference split it lacks that has images to extract (``extract_references`` makes one call a split)."""
    remaining = len(measured.test) - measured.size
    test_calls = measured.test_calls if measured.test_calls is not None else int(remaining > 0)
    return {e["name"]: test_calls + sum(1 for s in missing.get(e["name"], []) if references.get(s))
            for e in entries}


def project(measured: Probe, entries: list[dict], references: dict, missing: dict, devices: int,
            reserve_s: float) -> Projection:
    """The rest of the run from ``measured`` (see the module docstring). ``references``: split -> images still to
    extract; ``missing``: model -> its splits among them; ``devices``: how many devices share each extraction."""
    per_image = _rates(measured, entries, devices)
    if not per_image:  # nothing computed (all stored already, or all failed): no basis, assume it fits
        per_image = {e["name"]: 0.0 for e in entries}
    fallback_rate, fallback_once = max(per_image.values()), max(measured.load_seconds.values(), default=0.0)
    new_images = max(1, measured.size - measured.resumed)
    overhead = max(0.0, _loop(measured) - sum(measured.model_seconds.values())) / new_images
    remaining_test = len(measured.test) - measured.size
    calls = later_calls(measured, entries, references, missing)
    per_call, costs = {}, {}
    for e in entries:
        name = e["name"]
        images = remaining_test + sum(references[s] for s in missing.get(name, []))
        per_call[name] = measured.load_seconds.get(name, fallback_once) + measured.warmup_seconds.get(name, 0.0)
        costs[name] = per_image.get(name, fallback_rate) * images + calls[name] * per_call[name]
    setup = _setup(measured) + (measured.startup_seconds if devices > 1 else 0.0)
    n_calls = max(calls.values(), default=0)  # every call holds at least the most valuable kept model
    total_images = remaining_test + sum(references.values())
    return Projection(per_image, overhead, per_call, setup, calls, costs,
                      fixed=overhead * total_images + n_calls * setup + reserve_s)


def plan_after_probe(measured: Probe, entries: list[dict], references: dict, missing: dict, devices: int,
                     budget_s: float, reserve_s: float, report: PredictReport) -> list[dict]:
    """Step 3b: project the rest of the run from the probe (:func:`project`) and drop models (manifest
    ``priority``, highest number first) until it fits ``budget_s`` seconds, ``reserve_s`` included; returns the
    entries kept. ``references``: split -> images still to extract; ``missing``: model -> its splits among them;
    ``devices``: how many devices share each extraction."""
    p = project(measured, entries, references, missing, devices, reserve_s)
    priority = {e["name"]: e["priority"] for e in entries}
    plan = plan_models(p.costs, priority, budget_s, fixed_s=p.fixed)
    decide(report, "probe: %d test images in %.1f s; per model s/image: %s; overhead %.3f s/image; %s; "
           "projected %.0f s for the rest (incl. %.0f s reserve) vs %.0f s left",
           measured.size, measured.seconds, ", ".join(f"{k} {v:.3f}" for k, v in p.per_image.items()), p.overhead,
           p.one_time_line(measured), plan.projected_s, reserve_s, budget_s)
    for d in plan.decisions:
        decide(report, d)
    report.dropped = plan.dropped
    return [e for e in entries if e["name"] in plan.kept]
