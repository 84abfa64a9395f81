"""``python -m kernel predict``: the kernel's main job, inside a deadline, always leaving a valid submission.

What a run does, in order (every decision is logged with its numbers):

1. Reads the competition folder (SPEC §5) and writes a valid *fallback* submission at once (every test id,
   empty predictions), atomically: from here on a run killed at any moment leaves a valid file.
2. Links the precomputed train / index / non-landmark descriptors of ``--store`` (and ``--index-store``)
   into its working store, refusing descriptors whose ``meta.json`` names another checkpoint than the
   manifest pins. What is not precomputed is extracted from the competition folder (train/, index/) or
   ``--nonlandmark``.
3. *Probe*: extracts the first test images with every model, measures each model's seconds per image and the
   per-image overhead on this machine, projects the whole run, and when the projection passes the deadline
   drops models in the manifest's ``priority`` order (highest number first), saying which and why.
4. Extracts the rest in chunks; after each chunk it post-processes with the descriptors it has and replaces
   the submission with a better one (images not reached yet keep empty rows). Extraction stops cleanly at the
   deadline minus a reserve kept for the last post-processing.
5. Checks the final submission and prints a summary.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path


from kernel import store as kstore
from kernel.budget import plan_models
from kernel.errors import KernelError

log = logging.getLogger(__name__)

HELP = "predict a submission for a competition folder within a deadline (the Kaggle notebook's main job)"

# reference splits each track needs besides `test` (nonlandmark is optional: without it the
# recognition post-processing degrades to plain k-NN voting)
REFERENCE_SPLITS = {"recognition": ("train",), "retrieval": ("index", "train")}


@dataclass
class PredictReport:
    track: str
    out: str
    test_images: int
    models: list = field(default_factory=list)  # models used in the final submission
    dropped: list = field(default_factory=list)
    decisions: list = field(default_factory=list)
    submissions: int = 0  # submissions written (fallback included)
    predicted: int = 0  # test ids with a non-empty prediction in the final file
    failures: dict = field(default_factory=dict)
    seconds: float = 0.0
    finished: bool = False  # False in the log of a run that was interrupted or failed
    started: float = field(default_factory=time.monotonic, repr=False)

    def line(self) -> str:
        return (f"predict {self.track}: {self.predicted}/{self.test_images} test images predicted with "
                f"{len(self.models)} models ({', '.join(self.models) or 'none'}); "
                f"{len(self.dropped)} dropped; {len(self.failures)} unreadable images; "
                f"{self.submissions} submissions written; {self.seconds:.1f} s -> {self.out}")


def log_path(out) -> Path:
    """``<out>.log.json`` beside the submission (``submission.csv`` -> ``submission.log.json``)."""
    out = Path(out)
    return out.parent / f"{out.stem}.log.json"


def _write_log(report: PredictReport) -> None:
    """The report so far, atomically: an interrupted run leaves the decisions it made (``finished`` false)."""
    from kernel.store import atomic_write

    report.seconds = time.monotonic() - report.started
    data = json.dumps({k: v for k, v in report.__dict__.items() if k != "started"}, indent=2, default=str)
    try:
        atomic_write(log_path(report.out), lambda fh: fh.write(data.encode()))
    except OSError as exc:  # the log never costs the submission
        log.warning("%s: cannot write the run log (%s)", log_path(report.out), exc)


def _decide(report: PredictReport, message: str, *args) -> None:
    text = message % args if args else message
    report.decisions.append(text)
    log.info(text)
    if report.submissions:  # from the fallback on, the log on disk follows the run
        _write_log(report)


def _link_reference(src_store: Path, work: Path, entry: dict, split: str, report: PredictReport) -> bool:
    """Make ``work/<model>/<split>.npz`` point at a precomputed one; True when it is there."""
    name = entry["name"]
    src = kstore.split_path(src_store, name, split)
    if not src.is_file():
        return False
    meta_path = src_store / name / kstore.META
    if meta_path.is_file():
        meta = kstore.read_meta(src_store, name)
        if entry.get("sha256") and meta.get("sha256") and meta["sha256"] != entry["sha256"]:
            raise KernelError(
                f"{meta_path}: descriptors of '{name}' were computed with checkpoint sha256 "
                f"{meta['sha256'][:16]}..., the manifest pins {entry['sha256'][:16]}...: they do not belong together"
            )
        if meta.get("computed_with_sha256"):  # a converted checkpoint: remember which one computed them
            work_meta = kstore.read_meta(work, name)
            if work_meta.get("computed_with_sha256") != meta["computed_with_sha256"]:
                kstore.write_meta(work, name, {**work_meta, "computed_with_sha256": meta["computed_with_sha256"]})
    dst = kstore.split_path(work, name, split)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        if dst.resolve() == src.resolve():
            return True
        dst.unlink()
    try:
        os.symlink(src.resolve(), dst)
    except OSError:  # file systems without symlinks: copy
        import shutil

        shutil.copyfile(src, dst)
    _decide(report, "%s: using precomputed %s descriptors from %s", name, split, src)
    return True


def _write_meta(work: Path, entry: dict) -> None:
    if not (work / entry["name"] / kstore.META).is_file():
        kstore.write_meta(work, entry["name"], {
            "name": entry["name"], "family": entry["family"], "group": entry.get("group", entry["family"]),
            "image_size": entry["image_size"], "sha256": entry.get("sha256"), "checkpoint": entry["checkpoint"],
            "tracks": entry["tracks"], "dim": 512})


def _usable(work: Path, names: list[str], track: str) -> list[str]:
    need = ("test",) + REFERENCE_SPLITS[track]
    return [n for n in names if all(kstore.has_split(work, n, s) for s in need)]


def _postprocess(track: str, work: Path, train_labels, names: list[str], device, rerank: str, params: dict,
                 progress: bool, reuse: dict):
    """One post-processing of the working store. ``reuse``: ``prepared_dirs`` (the shipped stores'
    ``prepared/`` folders, then the working one), ``cache_dir`` (where test-independent work computed
    here is kept, so later chunks never recompute it) and ``memory_gb``."""
    from kernel.postprocess import pipeline

    if track == "recognition":
        return pipeline.recognition_from_store(work, train_labels, models=names, device=device, progress=progress,
                                               **reuse, **params)
    return pipeline.retrieval_from_store(work, train_labels, models=names, rerank=rerank, device=device,
                                         progress=progress, **reuse, **params)


def _count_predicted(predictions: dict) -> int:
    return sum(1 for v in predictions.values() if v)


def predict(
    track: str,
    data,
    manifest,
    weights,
    out,
    store=None,
    index_store=None,
    train_labels=None,
    work=None,
    nonlandmark=None,
    deadline_hours: float = 12.0,
    reserve_minutes: float | None = None,
    device=None,
    models=None,
    chunks: int = 4,
    min_chunk: int = 256,
    probe_images: int | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    rerank: str = "soft",
    params: dict | None = None,
    progress: bool = True,
    memory_gb: float | None = 10.0,
) -> PredictReport:
    """Run the whole job; see the module docstring. Returns a :class:`PredictReport`."""
    from kernel.data.sources import folder_source, kaggle_split
    from kernel.extract import extract
    from kernel.store import stored_ids
    from kernel.multidevice import extract_devices
    from kernel.models import load_manifest, select
    from kernel.submission import check_submission, write_submission

    t0 = time.monotonic()
    if track not in REFERENCE_SPLITS:
        raise KernelError(f"--track must be recognition or retrieval (got {track!r})")
    if not (math.isfinite(deadline_hours) and deadline_hours > 0):
        raise KernelError(f"--deadline-hours must be a positive number (got {deadline_hours})")
    if reserve_minutes is not None and not (math.isfinite(reserve_minutes) and reserve_minutes >= 0):
        raise KernelError(f"--reserve-minutes must be a number >= 0 (got {reserve_minutes})")
    deadline = t0 + deadline_hours * 3600
    reserve = (reserve_minutes * 60) if reserve_minutes is not None else min(1800.0, 0.05 * deadline_hours * 3600)
    _check_paths(out, data, manifest, weights, store, index_store, train_labels, nonlandmark, work)
    data, out = Path(data), Path(out)
    params = dict(params or {})

    entries = select(load_manifest(manifest), models, track)
    if not entries:
        raise KernelError(f"{manifest}: no model of the manifest serves the {track} track")
    priority = {e["name"]: e["priority"] for e in entries}
    test = kaggle_split(data, "test")
    report = PredictReport(track=track, out=str(out), test_images=len(test), started=t0)
    test = _writable(test, report)
    test_ids = [r.id for r in test]
    if not test_ids:
        raise KernelError(f"{data / 'test'}: no test images")

    # 1. a valid submission before anything can go wrong
    out.parent.mkdir(parents=True, exist_ok=True)
    write_submission(track, {}, test_ids, out)
    report.submissions += 1
    _decide(report, "fallback submission (%d rows, empty predictions) written to %s", len(test_ids), out)

    train_labels = Path(train_labels) if train_labels else data / "train.csv"
    if not train_labels.is_file():
        raise KernelError(f"{train_labels}: train labels (id,landmark_id) not found; pass --train-labels")
    _check_labels(train_labels, report)  # before any submission that depends on them
    work = Path(work) if work else out.parent / f"{track}_descriptors"
    work.mkdir(parents=True, exist_ok=True)

    # 2. reference descriptors: precomputed, or extracted here
    reference_records = {}
    missing = {}  # model -> splits to extract
    splits = list(REFERENCE_SPLITS[track]) + (["nonlandmark"] if track == "recognition" else [])
    for e in entries:
        _write_meta(work, e)
        for split in splits:
            src = Path(index_store) if (split == "index" and index_store) else (Path(store) if store else None)
            if src is not None and _link_reference(src, work, e, split, report):
                continue
            if kstore.has_split(work, e["name"], split):
                continue
            if split == "nonlandmark":
                if nonlandmark is None:
                    continue
                reference_records.setdefault(split, folder_source(nonlandmark))
            else:
                reference_records.setdefault(split, _writable(kaggle_split(data, split), report))
            missing.setdefault(e["name"], []).append(split)
    if missing:
        _decide(report, "to extract here (not precomputed): %s",
                "; ".join(f"{n}: {', '.join(s)}" for n, s in missing.items()))

    common = dict(device=device, batch_size=batch_size, workers=workers, progress=progress)
    # 3. probe: the first test images with every model, to measure this machine
    # a resumed run probes images it has not done yet, so it measures something
    done = set.intersection(*[stored_ids(work, e["name"], "test") for e in entries])
    todo = [r for r in test if r.id not in done]
    test = [r for r in test if r.id in done] + todo  # extraction order: finished ones first
    n_probe = min(len(test), len(done) + min(len(todo), probe_images or max(2 * (batch_size or 8), 16)))
    if done:
        _decide(report, "resuming: %d test images already have descriptors from every model", len(done))
    # (no deadline: the plan needs at least these numbers, and a probe is a few batches)
    probe = extract(entries, weights, test[:n_probe], "test", work, **common)
    report.failures.update(probe.failures)
    done_imgs = max(1, n_probe - len(done))
    per_image = {}
    for e in entries:
        n = e["name"]
        if probe.computed.get(n):
            per_image[n] = probe.model_seconds[n] / probe.computed[n] / len(extract_devices(device))  # all GPUs work
    if not per_image:  # nothing computed (all stored already, or all failed): no basis, assume it fits
        per_image = {e["name"]: 0.0 for e in entries}
    fallback_rate = max(per_image.values())
    overhead = max(0.0, probe.seconds - sum(probe.model_seconds.values())) / done_imgs
    remaining_test = len(test) - n_probe
    costs = {}
    for e in entries:
        n = e["name"]
        images = remaining_test + sum(len(reference_records[s]) for s in missing.get(n, []))
        costs[n] = per_image.get(n, fallback_rate) * images
    total_images = remaining_test + sum(len(r) for r in reference_records.values())
    budget_s = deadline - time.monotonic()
    plan = plan_models(costs, priority, budget_s, fixed_s=overhead * total_images + reserve)
    _decide(report, "probe: %d test images in %.1f s; per model s/image: %s; overhead %.3f s/image; "
            "projected %.0f s for the rest (incl. %.0f s reserve) vs %.0f s left",
            n_probe, probe.seconds, ", ".join(f"{k} {v:.3f}" for k, v in per_image.items()), overhead,
            plan.projected_s, reserve, budget_s)
    for d in plan.decisions:
        _decide(report, d)
    report.dropped = plan.dropped
    kept = [e for e in entries if e["name"] in plan.kept]

    # reference extraction for the kept models
    for split, records in reference_records.items():
        todo = [e for e in kept if split in missing.get(e["name"], [])]
        if todo and time.monotonic() < deadline - reserve:
            s = extract(todo, weights, records, split, work, deadline=deadline - reserve, **common)
            _decide(report, "%s", s.line())

    # 4. test images in chunks, a better submission after each
    from kernel.postprocess.prepared import prepared_dir

    shipped = [prepared_dir(s) for s in (store, index_store) if s]
    reuse = dict(prepared_dirs=shipped + [prepared_dir(work)], cache_dir=prepared_dir(work), memory_gb=memory_gb)
    names = [e["name"] for e in kept]
    n_chunks = max(1, min(chunks, math.ceil(remaining_test / max(1, min_chunk))))
    bounds = sorted({n_probe, *[n_probe + math.ceil(remaining_test * (i + 1) / n_chunks) for i in range(n_chunks)]})
    final_predictions = {}
    for end in bounds:
        if end > n_probe or end == len(test):
            if time.monotonic() >= deadline - reserve:
                _decide(report, "deadline reserve reached: no more extraction (%d of %d test images)",
                        n_probe, len(test))
            else:
                s = extract(kept, weights, test[:end], "test", work, deadline=deadline - reserve, **common)
                report.failures.update(s.failures)
                if s.stopped:
                    _decide(report, "extraction stopped (%s) at %d test images: %s", s.stopped, end, s.line())
        usable = _usable(work, names, track)
        if not usable:
            _decide(report, "no model has all of test + %s yet: keeping the fallback submission",
                    " + ".join(REFERENCE_SPLITS[track]))
            continue
        predictions = _postprocess(track, work, train_labels, usable, device, rerank, params, progress, reuse)
        write_submission(track, predictions, test_ids, out)
        report.submissions += 1
        report.models = usable
        final_predictions = predictions
        _decide(report, "submission %d: %d/%d test images predicted with %s", report.submissions,
                _count_predicted(predictions), len(test_ids), ", ".join(usable))
        if time.monotonic() >= deadline - reserve:
            break

    # 5. check what is on disk
    check_submission(track, out, test_ids)
    report.predicted = _count_predicted(final_predictions)
    report.finished = True
    _write_log(report)
    return report


def _check_paths(out, data, manifest, weights, store, index_store, train_labels, nonlandmark, work) -> None:
    """``--out`` (and the log beside it) must be a regular file path that is none of the run's inputs."""
    from kernel.cli import output_file

    inputs = [data, manifest, weights, store, index_store, train_labels, nonlandmark, work]
    output_file(out, "--out", inputs=inputs, side_files=[log_path(out)])


def _writable(records: list, report: PredictReport) -> list:
    """Records whose id a submission CSV can hold unchanged; the others are logged as failures."""
    from kernel.labels import id_problem

    keep = []
    for r in records:
        problem = id_problem(r.id)
        if problem:
            shown = r.id.encode("utf-8", "backslashreplace").decode()
            report.failures[shown] = f"id {problem}"
            log.warning("%s: skipped: id %r %s", r.path.encode("utf-8", "backslashreplace").decode(), shown, problem)
        else:
            keep.append(r)
    return keep


def _check_labels(train_labels: Path, report: PredictReport) -> None:
    """Read and check the train labels (Kaggle-integer landmark ids) while only the fallback exists."""
    from kernel.labels import read_train_labels

    labels = read_train_labels(train_labels)
    _decide(report, "train labels %s: %d images, %d landmarks", train_labels, len(labels), labels.nunique())


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
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--models", default=None, help="comma-separated subset of the manifest's models")
    p.add_argument("--rerank", choices=["soft", "two-stage", "none"], default="soft", help="retrieval re-ranking")
    p.add_argument("--chunks", type=number(int, 1), default=4, help="test extraction chunks, a better submission after each")
    p.add_argument("--min-chunk", type=number(int, 1), default=256, help="fewest test images in a chunk")
    p.add_argument("--probe-images", type=number(int, 1), default=None, help="test images timed before planning")
    p.add_argument("--batch-size", type=number(int, 1), default=None)
    p.add_argument("--workers", type=number(int, 0), default=None, help="decode processes (default: one per core)")
    p.add_argument("--memory-gb", type=number(float, 0, exclusive_min=True), default=10.0,
                   help="memory budget of the post-processing in GiB (default 10, the smallest Kaggle machine)")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    report = predict(
        args.track, args.data, args.manifest, args.weights, args.out, store=args.store,
        index_store=args.index_store, train_labels=args.train_labels, work=args.work, nonlandmark=args.nonlandmark,
        deadline_hours=args.deadline_hours, reserve_minutes=args.reserve_minutes, device=args.device,
        models=args.models, chunks=args.chunks, min_chunk=args.min_chunk, probe_images=args.probe_images, batch_size=args.batch_size,
        workers=args.workers, rerank=args.rerank, progress=not args.no_progress, memory_gb=args.memory_gb,
    )
    print(report.line())
    return 0
