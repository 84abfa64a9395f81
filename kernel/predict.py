"""``python -m kernel predict``: the kernel's main job, inside a deadline, always leaving a valid submission.

What a run does, in order (every decision is logged with its numbers; :func:`predict` calls one function a step):

1. Reads the competition folder (docs/kaggle.md#competition-folders) and writes a valid *fallback* submission at once (every test id,
   empty predictions), atomically: from here on a run killed at any moment leaves a valid file.
2. Uses the precomputed train / index / non-landmark descriptors of ``--store`` (and ``--index-store``) per
   image (:mod:`kernel.references`): the images the competition has now and the store holds are used as
   shipped (read in place), those it no longer has are left out, those it added are extracted here after the
   test set; descriptors whose ``meta.json`` names another checkpoint than the manifest pins are refused. A split
   nobody shipped is extracted from the competition folder (train/, index/) or ``--nonlandmark``.
3. *Probe*: extracts the first test images with every model, measures each model's seconds per image and the
   per-image overhead on this machine apart from the one-time costs (device start-up, model loading, warm-up),
   projects the whole run (:mod:`kernel.plan`: one-time costs once per later extraction call, not per image),
   and when the projection passes the deadline drops models in the manifest's ``priority`` order (highest
   number first), saying which and why.
4. Extracts the rest in chunks; after each chunk it post-processes with the descriptors it has and replaces
   the submission with a better one (images not reached yet keep empty rows). Extraction stops cleanly at the
   deadline minus a reserve kept for the last post-processing.
5. Checks the final submission and prints a summary.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path

from kernel.memory import DEFAULT_MEMORY_GB
from kernel import store as kstore
from kernel.errors import KernelError
from kernel.labels import read_train_labels
from kernel.plan import Probe, plan_after_probe  # noqa: F401 - step 3b, and the names the tests use
from kernel.predict_report import PredictReport, decide, log_path, write_log
from kernel.references import (REFERENCE_SPLITS, _writable, extract_added, extract_references,  # noqa: F401
                               reference_descriptors)

log = logging.getLogger(__name__)

HELP = "predict a submission for a competition folder within a deadline (the Kaggle notebook's main job)"

@dataclass
class PredictOptions:
    """What a run is asked to do: one field per ``python -m kernel predict`` flag of the same name (``index_store``
    is ``--index-store``), but ``progress``, the opposite of ``--no-progress``. Paths: ``str`` or ``Path``."""

    track: str  # "recognition" or "retrieval"
    data: str | Path  # competition folder: test/, train/ or index/, train.csv, ... (docs/kaggle.md#competition-folders)
    manifest: str | Path  # weights_manifest.json: the models, their checkpoints, tracks and priorities
    weights: str | Path  # folder holding the checkpoints the manifest names
    out: str | Path  # submission.csv, replaced atomically as it improves; <stem>.log.json is written beside it
    store: str | Path | None = None  # precomputed descriptor store (train, nonlandmark, index); None: none
    index_store: str | Path | None = None  # precomputed index descriptors kept apart; None: look in `store`
    train_labels: str | Path | None = None  # train.csv (id,landmark_id); None: DATA/train.csv
    work: str | Path | None = None  # working descriptor store; None: <folder of out>/<track>_descriptors
    nonlandmark: str | Path | None = None  # non-landmark image folder, extracted when `store` has no such split
    deadline_hours: float = 12.0  # wall-clock budget of the whole run, in hours (> 0)
    reserve_minutes: float | None = None  # kept for the last post-processing, minutes; None: 5% of budget, <= 30
    device: str | None = None  # "cuda", "cuda:N" or "cpu"; None: every visible GPU, else the CPU
    models: str | list | None = None  # subset of the manifest's models (comma-separated or a list); None: all
    chunks: int = 4  # test extraction chunks after the probe, a better submission after each (>= 1)
    min_chunk: int = 256  # fewest test images in a chunk, in images (fewer chunks on a small test set)
    probe_images: int | None = None  # new test images timed before planning; None: two batches, at least 16
    batch_size: int | None = None  # images per decoded batch; None: extract's default (32 on CUDA, 8 on CPU)
    workers: int | None = None  # decode processes; None: extract's default (one per core); 0: in this process
    rerank: str = "soft"  # retrieval re-ranking: "soft", "two-stage" or "none"
    progress: bool = True  # progress bars on stderr
    memory_gb: float | None = DEFAULT_MEMORY_GB  # memory budget of the post-processing, in GiB; None: the search's default

    def check(self) -> None:
        """Refuse a track or time budget a caller from Python could pass past argparse."""
        if self.track not in REFERENCE_SPLITS:
            raise KernelError(f"--track must be recognition or retrieval (got {self.track!r})")
        if not (math.isfinite(self.deadline_hours) and self.deadline_hours > 0):
            raise KernelError(f"--deadline-hours must be a positive number (got {self.deadline_hours})")
        reserve = self.reserve_minutes
        if reserve is not None and not (math.isfinite(reserve) and reserve >= 0):
            raise KernelError(f"--reserve-minutes must be a number >= 0 (got {reserve})")

    def reserve_s(self) -> float:
        """Seconds kept free before the deadline for the last post-processing."""
        given = self.reserve_minutes
        return given * 60 if given is not None else min(1800.0, 0.05 * self.deadline_hours * 3600)

    def extract_kwargs(self) -> dict:
        """The options every extraction call of the run shares."""
        return dict(device=self.device, batch_size=self.batch_size, workers=self.workers, progress=self.progress)


def _usable(work: Path, names: list[str], track: str) -> list[str]:
    need = ("test",) + REFERENCE_SPLITS[track]
    return [n for n in names if all(kstore.has_split(work, n, s) for s in need)]


def _reuse(opts: PredictOptions, work: Path) -> dict:
    """What every post-processing reuses: ``prepared_dirs`` (the shipped stores' ``prepared/``, then the working
    one), ``cache_dir`` (test-independent work computed here, never recomputed by later chunks), ``memory_gb``."""
    from kernel.postprocess.prepared import prepared_dir

    shipped = [prepared_dir(s) for s in (opts.store, opts.index_store) if s]
    return dict(prepared_dirs=shipped + [prepared_dir(work)], cache_dir=prepared_dir(work), memory_gb=opts.memory_gb)


def _postprocess(opts: PredictOptions, work: Path, train_labels, names: list[str], reuse: dict) -> dict:
    """One post-processing of the working store with the models ``names``: test id -> prediction.
    ``train_labels``: the checked labels (read once per run, not once per chunk)."""
    from kernel.postprocess import pipeline

    if opts.track == "recognition":
        return pipeline.recognition_from_store(work, train_labels, models=names, device=opts.device,
                                               progress=opts.progress, **reuse)
    return pipeline.retrieval_from_store(work, train_labels, models=names, rerank=opts.rerank, device=opts.device,
                                         progress=opts.progress, **reuse)


def _count_predicted(predictions: dict) -> int:
    return sum(1 for v in predictions.values() if v)


def predict(opts: PredictOptions) -> PredictReport:
    """Run the whole job, one function a step (see the module docstring). Returns a :class:`PredictReport`."""
    from kernel.multidevice import extract_devices

    t0 = time.monotonic()
    entries, test, report = open_run(opts, t0)
    deadline = t0 + opts.deadline_hours * 3600
    stop_at = deadline - opts.reserve_s()  # extraction stops here, leaving the reserve to post-processing
    test_ids = [r.id for r in test]
    write_fallback(opts.track, test_ids, Path(opts.out), report)
    train_labels, work = labels_and_work(opts, report)
    records, missing, added = reference_descriptors(opts, entries, work, train_labels, report)
    measured = probe(opts, entries, test, work, report)
    devices = len(extract_devices(opts.device))
    kept = plan_after_probe(measured, entries, {s: len(r) for s, r in records.items()}, missing,
                            devices, deadline - time.monotonic(), opts.reserve_s(), report)
    extract_references(opts, kept, records, missing, work, stop_at, report)
    after_test = (lambda: extract_added(opts, kept, added, work, *added_costs(measured, kept, devices), stop_at,
                                        report)) if added else None
    final = extract_test_in_chunks(opts, kept, measured, test_ids, work, train_labels, stop_at, report, after_test)
    finish(opts.track, Path(opts.out), test_ids, final, report)
    return report


def open_run(opts: PredictOptions, started: float) -> tuple[list[dict], list, PredictReport]:
    """Check the options; read the track's manifest entries and the test records a submission can hold."""
    from kernel.cli import output_file
    from kernel.data.sources import kaggle_split
    from kernel.models import load_manifest, select

    opts.check()
    inputs = [opts.data, opts.manifest, opts.weights, opts.store, opts.index_store, opts.train_labels,
              opts.nonlandmark, opts.work]  # --out (and the log beside it): a regular file path, none of these
    output_file(opts.out, "--out", inputs=inputs, side_files=[log_path(opts.out)])
    entries = select(load_manifest(opts.manifest), opts.models, opts.track)
    if not entries:
        raise KernelError(f"{opts.manifest}: no model of the manifest serves the {opts.track} track")
    data = Path(opts.data)
    test = kaggle_split(data, "test")
    report = PredictReport(track=opts.track, out=str(Path(opts.out)), test_images=len(test), started=started)
    test = _writable(test, report)
    if not test:
        raise KernelError(f"{data / 'test'}: no test images")
    return entries, test, report


def write_fallback(track: str, test_ids: list[str], out: Path, report: PredictReport) -> None:
    """Step 1: every test id with an empty prediction, before anything can go wrong; the log follows from here."""
    from kernel.submission import write_submission

    out.parent.mkdir(parents=True, exist_ok=True)
    write_submission(track, {}, test_ids, out)
    report.submissions += 1
    decide(report, "fallback submission (%d rows, empty predictions) written to %s", len(test_ids), out)


def labels_and_work(opts: PredictOptions, report: PredictReport):
    """The train labels (a Series id -> landmark id, read and checked once, while only the fallback exists) and
    the working store, created."""
    train_labels = Path(opts.train_labels) if opts.train_labels else Path(opts.data) / "train.csv"
    if not train_labels.is_file():
        raise KernelError(f"{train_labels}: train labels (id,landmark_id) not found; pass --train-labels")
    labels = read_train_labels(train_labels)
    decide(report, "train labels %s: %d images, %d landmarks", train_labels, len(labels), labels.nunique())
    work = Path(opts.work) if opts.work else Path(opts.out).parent / f"{opts.track}_descriptors"
    work.mkdir(parents=True, exist_ok=True)
    return labels, work


def added_costs(measured: "Probe", kept: list[dict], devices: int) -> tuple[float, float]:
    """(seconds per image, one-time seconds) of one more extraction call with the kept models, from the probe
    (:func:`kernel.plan.project`): their steady rates plus the per-image overhead; their loading, warm-up, setup."""
    from kernel.plan import project

    p = project(measured, kept, {}, {}, max(1, devices), 0.0)
    return sum(p.per_image.values()) + p.overhead, sum(p.per_call.values()) + p.setup


def probe(opts: PredictOptions, entries: list[dict], test: list, work: Path, report: PredictReport) -> Probe:
    """Step 3a: the first test images not done yet, with every model (no deadline: the plan needs these numbers,
    and a probe is a few batches). A resumed run probes images it has not done, so it measures something. By
    default two batches of the device's batch size (at least 16 images): the second gives each model's steady
    rate, so that its first batch's warm-up counts once, not per image (:mod:`kernel.plan`)."""
    from kernel.extract import DEFAULT_BATCH, extract
    from kernel.multidevice import extract_devices

    done = set.intersection(*[kstore.stored_ids(work, e["name"], "test") for e in entries])
    todo = [r for r in test if r.id not in done]
    test = [r for r in test if r.id in done] + todo  # extraction order: finished ones first
    batch = opts.batch_size or DEFAULT_BATCH["cuda" if extract_devices(opts.device)[0].type == "cuda" else "cpu"]
    n_new = min(len(todo), opts.probe_images or max(2 * batch, 16))
    n_probe = min(len(test), len(done) + n_new)
    if done:
        decide(report, "resuming: %d test images already have descriptors from every model", len(done))
    s = extract(entries, opts.weights, test[:n_probe], "test", work, **opts.extract_kwargs())
    report.failures.update(s.failures)
    later = sum(1 for end in chunk_ends(n_probe, len(test), opts.chunks, opts.min_chunk) if end > n_probe)
    return Probe.from_summary(test, n_probe, len(done), s, test_calls=later)


def chunk_ends(start: int, total: int, chunks: int, min_chunk: int) -> list[int]:
    """Where each test chunk ends: ``start`` (the probe's images, submitted first), then at most ``chunks``
    chunks of at least ``min_chunk`` images (one when fewer remain), the last ending at ``total``."""
    rest = total - start
    n_chunks = max(1, min(chunks, math.ceil(rest / max(1, min_chunk))))
    return sorted({start, *[start + math.ceil(rest * (i + 1) / n_chunks) for i in range(n_chunks)]})


def extract_test_chunk(opts: PredictOptions, kept: list[dict], measured: Probe, end: int, work: Path,
                       stop_at: float, report: PredictReport) -> None:
    """Step 4a: the kept models' descriptors of ``test[:end]`` (what is missing), unless ``stop_at`` passed."""
    from kernel.extract import extract

    if time.monotonic() >= stop_at:
        decide(report, "deadline reserve reached: no more extraction (%d of %d test images)",
               measured.size, len(measured.test))
        return
    s = extract(kept, opts.weights, measured.test[:end], "test", work, deadline=stop_at, **opts.extract_kwargs())
    report.failures.update(s.failures)
    if s.stopped:
        decide(report, "extraction stopped (%s) at %d test images: %s", s.stopped, end, s.line())


def write_better(track: str, predictions: dict, test_ids: list[str], out: Path, models: list[str],
                 report: PredictReport) -> None:
    """Step 4b: replace the submission with one from ``predictions`` of ``models``. The candidate is checked
    before it replaces anything: a broken one raises :class:`KernelError` and the previous file stays."""
    from kernel.submission import write_submission

    write_submission(track, predictions, test_ids, out)
    report.submissions += 1
    report.models = models
    decide(report, "submission %d: %d/%d test images predicted with %s", report.submissions,
           _count_predicted(predictions), len(test_ids), ", ".join(models))


def extract_test_in_chunks(opts: PredictOptions, kept: list[dict], measured: Probe, test_ids: list[str],
                           work: Path, labels, stop_at: float, report: PredictReport, after_test=None) -> dict:
    """Step 4: the test images in chunks (:func:`chunk_ends`), a better submission after each, until
    ``stop_at``; ``after_test`` runs once the last chunk is extracted, before its post-processing (the
    reference images the competition added: the test set comes first). Returns the predictions of the last
    submission written (empty: the fallback stands)."""
    reuse = _reuse(opts, work)
    names = [e["name"] for e in kept]
    final_predictions = {}
    for end in chunk_ends(measured.size, len(measured.test), opts.chunks, opts.min_chunk):
        if end > measured.size or end == len(measured.test):
            extract_test_chunk(opts, kept, measured, end, work, stop_at, report)
        if end == len(measured.test) and after_test is not None:
            after_test()
        usable = _usable(work, names, opts.track)
        if not usable:
            decide(report, "no model has all of test + %s yet: keeping the fallback submission",
                   " + ".join(REFERENCE_SPLITS[opts.track]))
            continue
        predictions = _postprocess(opts, work, labels, usable, reuse)
        write_better(opts.track, predictions, test_ids, Path(opts.out), usable, report)
        final_predictions = predictions
        if time.monotonic() >= stop_at:
            break
    return final_predictions


def finish(track: str, out: Path, test_ids: list[str], predictions: dict, report: PredictReport) -> None:
    """Step 5: check the submission on disk (a failure leaves the log unfinished), then log the run finished."""
    from kernel.submission import check_submission

    check_submission(track, out, test_ids)
    report.predicted = _count_predicted(predictions)
    report.finished = True
    write_log(report)


def add_arguments(p) -> None:
    from kernel.cli import number

    p.add_argument("--track", choices=["recognition", "retrieval"], required=True)
    p.add_argument("--data", required=True, help="competition folder (test/, train/ or index/, train.csv, ...)")
    p.add_argument("--manifest", required=True, help="weights_manifest.json")
    p.add_argument("--weights", required=True, help="folder with the checkpoints the manifest names")
    p.add_argument("--out", required=True, help="submission.csv to write (replaced atomically as it improves)")
    p.add_argument("--store", default=None, help="precomputed descriptor store (train, nonlandmark, index)")
    p.add_argument("--index-store", default=None, help="precomputed index descriptors, if kept apart")
    p.add_argument("--train-labels", default=None, help="train.csv id,landmark_id (default: DATA/train.csv)")
    p.add_argument("--work", default=None, help="working descriptor store (default: next to --out)")
    p.add_argument("--nonlandmark", default=None, help="folder of non-landmark images for the recognition bank "
                   "(when the store has no nonlandmark descriptors)")
    p.add_argument("--deadline-hours", type=number(float, 0, exclusive_min=True), default=12.0,
                   help="wall-clock budget of the run (default 12)")
    p.add_argument("--reserve-minutes", type=number(float, 0), default=None,
                   help="kept free for the last post-processing (default: 5%% of the budget, at most 30)")
    p.add_argument("--device", default=None, help="cuda (every GPU), cuda:N or cpu (default: every GPU, else the CPU)")
    p.add_argument("--models", default=None, help="comma-separated subset of the manifest's models")
    p.add_argument("--rerank", choices=["soft", "two-stage", "none"], default="soft", help="retrieval re-ranking")
    p.add_argument("--chunks", type=number(int, 1), default=4, help="test extraction chunks, a better submission after each")
    p.add_argument("--min-chunk", type=number(int, 1), default=256, help="fewest test images in a chunk")
    p.add_argument("--probe-images", type=number(int, 1), default=None, help="test images timed before planning")
    p.add_argument("--batch-size", type=number(int, 1), default=None)
    p.add_argument("--workers", type=number(int, 0), default=None, help="decode processes (default: as for extract)")
    p.add_argument("--memory-gb", type=number(float, 0, exclusive_min=True), default=DEFAULT_MEMORY_GB,
                   help="memory budget of the post-processing in GiB (default 10, the smallest Kaggle machine)")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    # every option is the argparse destination of the same name, but progress (--no-progress)
    given = {f.name: getattr(args, f.name) for f in fields(PredictOptions) if f.name != "progress"}
    report = predict(PredictOptions(**given, progress=not args.no_progress))
    print(report.line())
    return 0
