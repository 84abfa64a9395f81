"""Step 2 of ``predict``: the reference descriptors (train, index, non-landmark bank) of the working store.

Per model and split: a shipped split is used per image (:mod:`kernel.coverage`): when the competition has the same
images it is linked as it is; when images were added or removed, a view (:mod:`kernel.views`) reads the shipped
file in place without the images gone, and the images added are extracted here *after* the test set
(:func:`extract_added`), as far as the time left allows. A split nobody shipped is extracted here before the test
set (:func:`extract_references`): post-processing needs it. Shipped descriptor files are never copied: where a
symbolic link cannot be made, a view reads them in place.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from kernel import store as kstore
from kernel.coverage import common_added, compare, present_records
from kernel.errors import KernelError
from kernel.predict_report import PredictReport, decide
from kernel.views import added_split, read_view, view_path, write_view

log = logging.getLogger(__name__)

# reference splits each track needs besides `test` (nonlandmark is optional: without it the
# recognition post-processing degrades to plain k-NN voting)
REFERENCE_SPLITS = {"recognition": ("train",), "retrieval": ("index", "train")}


def check_shipped_meta(src_store: Path, work: Path, entry: dict) -> None:
    """Refuse shipped descriptors computed with another checkpoint than the manifest pins; carry the sha256 of a
    converted checkpoint's source into the working store's meta."""
    name = entry["name"]
    meta_path = src_store / name / kstore.META
    if not meta_path.is_file():
        return
    meta = kstore.read_meta(src_store, name)
    if entry.get("sha256") and meta.get("sha256") and meta["sha256"] != entry["sha256"]:
        raise KernelError(
            f"{meta_path}: descriptors of '{name}' were computed with checkpoint sha256 "
            f"{meta['sha256'][:16]}..., the manifest pins {entry['sha256'][:16]}...: they do not belong together")
    if meta.get("computed_with_sha256"):  # a converted checkpoint: remember which one computed them
        work_meta = kstore.read_meta(work, name)
        if work_meta.get("computed_with_sha256") != meta["computed_with_sha256"]:
            kstore.write_meta(work, name, {**work_meta, "computed_with_sha256": meta["computed_with_sha256"]})


def link_shipped(src: Path, work: Path, name: str, split: str, exclude=()) -> str:
    """``work/<name>/<split>``: a symbolic link to the shipped file ``src``, or a view of it when ids are left
    out or no link can be made (never a copy). Returns "link" or "view"."""
    dst = kstore.split_path(work, name, split)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() and dst.resolve() != src.resolve():
        dst.unlink()  # an earlier run's link (a link is all this code ever puts there)
    if not exclude:
        view_path(work, name, split).unlink(missing_ok=True)
        if dst.is_symlink():
            return "link"
        try:
            os.symlink(src.resolve(), dst)
            return "link"
        except OSError as exc:  # file systems without symbolic links: read it in place
            log.info("%s: no symbolic link possible here (%s): a view reads %s in place", dst, exc, src)
    if dst.is_symlink():
        dst.unlink()
    write_view(work, name, split, src, exclude=exclude)
    return "view"


def reference_descriptors(opts, entries: list[dict], work: Path, labels, report: PredictReport):
    """Step 2: the reference splits of ``work`` from the shipped stores, per image. Returns what is left to
    extract: ``({split: records}, {model: [split, ...]}, {split: {model: added records}})`` - splits nobody
    shipped (before the test set), and images the competition added to shipped splits (after it)."""
    from kernel.data.sources import kaggle_split

    records, missing, added = {}, {}, {}
    present = {}  # split -> records present now (None: nothing to compare with), listed once per split
    splits = list(REFERENCE_SPLITS[opts.track]) + (["nonlandmark"] if opts.track == "recognition" else [])
    for e in entries:
        _write_meta(work, e)
        for split in splits:
            if split not in present:
                present[split] = present_records(Path(opts.data), split, labels, opts.nonlandmark)
            src = opts.index_store if (split == "index" and opts.index_store) else opts.store
            src_file = kstore.split_path(src, e["name"], split) if src else None
            if src_file is not None and src_file.is_file():
                check_shipped_meta(Path(src), work, e)
                new = _use_shipped(src_file, work, e["name"], split, present[split], report)
                if new:
                    added.setdefault(split, {})[e["name"]] = new
            elif kstore.has_split(work, e["name"], split) or (split == "nonlandmark" and present[split] is None):
                continue
            else:  # nobody shipped it: extracted here (a missing folder is one clear error)
                records.setdefault(split, _writable(present[split] if present[split] is not None else
                                                    kaggle_split(Path(opts.data), split), report))
                missing.setdefault(e["name"], []).append(split)
    if missing:
        decide(report, "to extract here (not precomputed): %s",
               "; ".join(f"{n}: {', '.join(s)}" for n, s in missing.items()))
    return records, missing, added


def _use_shipped(src_file: Path, work: Path, name: str, split: str, present, report: PredictReport) -> list:
    """One model's shipped split in ``work``, per image; returns the records to extract after the test set."""
    if present is None:
        how = link_shipped(src_file, work, name, split)
        decide(report, "%s: using precomputed %s descriptors from %s as shipped (%s; no %s folder to compare "
               "with)", name, split, src_file, how, split)
        return []
    cov = compare(split, kstore.read_ids(src_file), present)
    how = link_shipped(src_file, work, name, split, exclude=cov.gone)
    report.coverage.setdefault(split, {})[name] = {"shipped": cov.shipped, "present": cov.present,
                                                   "used": cov.used, "added": len(cov.added),
                                                   "gone": len(cov.gone), "extracted": 0}
    decide(report, "%s: precomputed %s from %s (%s): %s", name, split, src_file, how, cov.line())
    return cov.added


def extract_references(opts, kept: list[dict], records: dict, missing: dict, work: Path,
                       stop_at: float, report: PredictReport) -> None:
    """Step 3c: the reference splits the kept models lack, until ``stop_at`` (a ``time.monotonic()`` value)."""
    from kernel.extract import extract

    for split, split_records in records.items():
        todo = [e for e in kept if split in missing.get(e["name"], [])]
        if todo and time.monotonic() < stop_at:
            s = extract(todo, opts.weights, split_records, split, work, deadline=stop_at, **opts.extract_kwargs())
            decide(report, "%s", s.line())


def added_that_fit(records: list, seconds_per_image: float, seconds_left: float) -> int:
    """How many of the added reference images the time left covers (all when the rate is unknown)."""
    if seconds_per_image <= 0:
        return len(records)
    return max(0, min(len(records), int(seconds_left / seconds_per_image)))


def extract_added(opts, kept: list[dict], added: dict, work: Path, seconds_per_image: float, one_time_s: float,
                  stop_at: float, report: PredictReport) -> bool:
    """After the test set: the images the competition added to shipped splits, with the kept models, as many as
    the time before ``stop_at`` allows (``seconds_per_image``: all kept models together; ``one_time_s``: what a
    call pays before its first image, loading the models); then every kept model's view takes the added images
    all of them hold. True when a view changed."""
    from kernel.extract import extract

    changed = False
    names = [e["name"] for e in kept]
    for split, per_model in added.items():
        todo = sorted({r.id: r for m in names for r in per_model.get(m, [])}.values(), key=lambda r: r.id)
        if not todo:
            continue
        n = added_that_fit(todo, seconds_per_image, stop_at - time.monotonic() - one_time_s)
        decide(report, "%s: %d images present, not shipped; time left for %d (%.3f s per image with %d models)%s",
               split, len(todo), n, seconds_per_image, len(names),
               "" if n == len(todo) else f"; left out: {len(todo) - n} (first {todo[n].id})")
        if n:
            s = extract([e for e in kept if e["name"] in per_model], opts.weights, todo[:n], added_split(split),
                        work, deadline=stop_at, **opts.extract_kwargs())
            decide(report, "%s", s.line())
        changed |= _take_added(work, [m for m in names if m in per_model], split, report)
    return changed


def _take_added(work: Path, names: list[str], split: str, report: PredictReport) -> bool:
    """Point every model's view of ``split`` at its added descriptors, keeping the ids all models hold."""
    have = {}
    for m in names:
        path = kstore.split_path(work, m, added_split(split))
        have[m] = set(kstore.read_ids(path).tolist()) if path.is_file() else set()
    common = common_added(have)
    for m in names:
        view = read_view(work, m, split)
        if view is None:  # linked as shipped: a view of the same file, nothing left out
            view_base, exclude = kstore.split_path(work, m, split).resolve(), ()
        else:
            view_base, exclude = view.base, view.exclude
        write_view(work, m, split, view_base, exclude=exclude,
                   added=added_split(split) if have[m] else None, added_exclude=have[m] - common)
        if kstore.split_path(work, m, split).is_symlink():
            kstore.split_path(work, m, split).unlink()
        report.coverage.get(split, {}).get(m, {})["extracted"] = len(common)
    decide(report, "%s: %d added images in the reference set of %s", split, len(common), ", ".join(names))
    return bool(common)


def _write_meta(work: Path, entry: dict) -> None:
    from kernel.extract.resume import descriptor_dim

    if not (work / entry["name"] / kstore.META).is_file():
        meta = kstore.model_meta(entry, entry.get("sha256"), None, descriptor_dim(entry))
        kstore.write_meta(work, entry["name"], meta)


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
