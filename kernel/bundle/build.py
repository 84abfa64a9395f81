"""From checkpoints to an uploadable Kaggle dataset and notebook, in three phases.

The options are one :class:`BundleOptions`; :func:`build_bundle` runs the phases, each a function of its own.

1. *Validate* everything, writing nothing (the Kaggle ids and numbers when the :class:`BundleOptions` is made;
   then :func:`check_inputs`, the checks in :mod:`kernel.bundle.checks`): the manifest and the model selection (unknown model names, models outside the track), every
   checkpoint (present, sha256 as pinned, loads strictly into its manifest entry), the descriptor stores
   (complete splits, ``meta.json`` naming the same checkpoint), the train labels, the wheels, the output
   folder, and Kaggle's dataset limits on what is copied unchanged (:mod:`kernel.bundle.limits`). Any problem
   raises :class:`KernelError` naming it.
2. *Stage* the dataset and notebook(s) in a temporary folder next to ``out`` (:func:`stage`, the writers in
   :mod:`kernel.bundle.ship`): package source, checkpoints (copied byte for byte, or converted and checked on
   real descriptors, see :mod:`kernel.bundle.convert`), manifest with every sha256 filled in, stores, labels,
   wheels, ``BUILD.json`` (the file list the notebook verifies), ``dataset-metadata.json``, the notebook with
   its ``kernel-metadata.json``, the report. The staged dataset is checked against Kaggle's limits (file
   count and bytes of what ``kaggle datasets create`` uploads) before it is published.
3. *Publish* (:func:`publish`): the staging folder replaces ``out`` in one rename (a previous build there is
   removed). A crash or an error before that leaves ``out`` as it was.

Layout of ``out``::

    dataset/    dataset-metadata.json  BUILD.json  weights_manifest.json  requirements.txt  kernel/
                weights/<checkpoint>  wheels/*.whl + requirements.txt  [store/]  [index-store/]  [train.csv]
    notebook/   kernel-metadata.json  <slug>-<track>.ipynb (or .py with --headless)
                (--track both: notebook/recognition/ and notebook/retrieval/)
    report.json  report.txt
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from kernel.bundle import convert, limits, notebook, report as kreport, ship, wheels as kwheels
from kernel.bundle.checks import (REPO_ROOT, ModelPlan, check_checkpoints, check_labels_for, check_out,
                                  check_stores, resolve_manifest, select_models)
from kernel.errors import KernelError

log = logging.getLogger(__name__)

DEFAULT_SLUG = "glr2021-kernel"
DEFAULT_DEADLINE_HOURS = 11.5


# ------------------------------------------------------------------------------------------ identities

def slugify(text: str) -> str:
    """Kaggle's slug of a title: lower case, runs of other characters as one '-'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def check_identity(user: str, slug: str, title: str, tracks: list[str]) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", user or ""):
        raise KernelError(f"--user {user!r}: a Kaggle user name (letters, digits, '-', '_')")
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{1,48}[a-z0-9]", slug):
        raise KernelError(f"--slug {slug!r}: 3-50 characters, lower-case letters, digits and '-'")
    if not 6 <= len(title) <= 50:
        raise KernelError(f"--title {title!r}: Kaggle wants a dataset title of 6-50 characters")
    for t in tracks:
        if len(kernel_slug(slug, t)) > 50:
            raise KernelError(f"--slug {slug!r}: the notebook id '{kernel_slug(slug, t)}' would exceed 50 characters")


def kernel_slug(slug: str, track: str) -> str:
    return slugify(f"{slug} {track}")


def tracks_of(track: str) -> list[str]:
    if track == "both":
        return ["recognition", "retrieval"]
    if track not in notebook.COMPETITIONS:
        raise KernelError(f"--track must be recognition, retrieval or both (got {track!r})")
    return [track]


# ------------------------------------------------------------------------------------------ options

def _optional_path(value) -> Path | None:
    return None if value is None else Path(value)


@dataclass
class BundleOptions:
    """What to build: the options of ``build_kernel.py`` / ``python -m kernel bundle`` (``--NAME`` on the
    command line, ``-`` for ``_``). Values are checked when the options are made (:class:`KernelError`
    naming the option); files and folders are checked by :func:`check_inputs`."""

    weights: Path  # folder with the checkpoints the manifest names
    out: Path  # build folder: dataset/, notebook/, report.{json,txt}; an earlier build there is replaced
    user: str  # Kaggle user name, owner of the dataset and the notebook(s)
    manifest: Path | None = None  # None: WEIGHTS/weights_manifest.json, else the repository's
    slug: str = DEFAULT_SLUG  # dataset slug (mounted at /kaggle/input/SLUG); notebooks are SLUG-<track>
    title: str | None = None  # dataset title, 6-50 characters (None: "SLUG bundle")
    track: str = "recognition"  # recognition, retrieval or both (one notebook each)
    models: str | list[str] | None = None  # subset of the manifest's models, comma-separated or a list
    store: Path | None = None  # precomputed descriptor store to ship (train, nonlandmark, index splits)
    index_store: Path | None = None  # precomputed index descriptors kept apart (retrieval)
    train_labels: Path | None = None  # train.csv (id,landmark_id) to ship; required for retrieval
    headless: bool = False  # a .py script kernel instead of an .ipynb notebook
    fp16: bool = False  # ship checkpoints in half precision (checked against fp16_tolerance)
    strip_heads: bool = True  # drop training heads and optimizer payload (checked: identical descriptors)
    fp16_tolerance: float = convert.DEFAULT_FP16_TOLERANCE  # minimum per-image cosine of fp16 descriptors
    check_images: int = 4  # bundled sample photos used to check converted checkpoints
    wheel_requirements: list[str] | None = None  # NAME==VERSION or .whl paths (None: the pinned timm)
    wheel_dirs: tuple = ()  # folders of wheels searched before the cache and pip download
    allow_download: bool = True  # may run pip download for a wheel found nowhere else
    license_name: str = "other"  # dataset license in dataset-metadata.json
    deadline_hours: float = DEFAULT_DEADLINE_HOURS  # the notebook's total budget, in (0, 12]
    predict_args: tuple = ()  # extra arguments of `python -m kernel predict` in the notebook
    private: bool = True  # the notebook's visibility
    progress: bool = True  # progress bars
    accelerator: str = "t4x2"  # the notebook's Kaggle accelerator: t4x2, p100 or cpu

    def __post_init__(self) -> None:
        self.weights, self.out = Path(self.weights), Path(self.out)
        for name in ("manifest", "store", "index_store", "train_labels"):
            setattr(self, name, _optional_path(getattr(self, name)))
        self.wheel_dirs, self.predict_args = tuple(self.wheel_dirs), tuple(self.predict_args)
        self.title = self.title or f"{self.slug} bundle"
        check_identity(self.user, self.slug, self.title, self.tracks)
        if not 0 < self.fp16_tolerance <= 1:
            raise KernelError(f"--fp16-tolerance must be in (0, 1] (got {self.fp16_tolerance})")
        photos = len(list(convert.SAMPLE_DIR.glob("*.jpg")))
        if not 1 <= self.check_images <= photos:
            raise KernelError(f"--check-images must be between 1 and the {photos} bundled photos")
        if not 0 < self.deadline_hours <= 12:
            raise KernelError(f"--deadline-hours must be in (0, 12] (Kaggle's limit; got {self.deadline_hours})")

    @property
    def tracks(self) -> list[str]:
        return tracks_of(self.track)

    @property
    def dataset_id(self) -> str:
        return f"{self.user}/{self.slug}"

    def report_options(self) -> dict:
        """The options the report lists."""
        return {"fp16": self.fp16, "strip_heads": self.strip_heads, "fp16_tolerance": self.fp16_tolerance,
                "check_images": self.check_images, "headless": self.headless,
                "deadline_hours": self.deadline_hours, "accelerator": self.accelerator}


# ------------------------------------------------------------------------------------------ phase 1

@dataclass
class CheckedInputs:
    """What phase 1 found: every input checked, nothing written yet."""

    manifest: Path  # the manifest the models come from
    plans: list[ModelPlan]  # the selected models, their checkpoints checked
    store_items: dict  # {"store"|"index-store": (folder, [(model, split, path, rows, dim, meta), ...])}
    labels_rows: int  # rows of the train labels to ship (0: none)
    wheels: list  # kernel.bundle.wheels.Wheel to ship
    warnings: list[str] = field(default_factory=list)  # for the report


def check_inputs(opts: BundleOptions) -> CheckedInputs:
    """Phase 1: the folders, the model selection, every checkpoint, the stores, the labels and the wheels.
    Raises :class:`KernelError` naming the first problem; writes nothing."""
    from kernel.models import load_manifest

    if not opts.weights.is_dir():
        raise KernelError(f"--weights {opts.weights}: folder not found")
    check_out(opts.out, (opts.weights, opts.manifest, opts.store, opts.index_store, opts.train_labels))
    warnings: list[str] = notebook.check_accelerator(opts.accelerator)
    manifest = resolve_manifest(opts.weights, opts.manifest)
    entries = select_models(load_manifest(manifest), opts.models, opts.tracks, manifest)
    labels_rows = check_labels_for(opts.tracks, opts.train_labels, warnings)
    plans = check_checkpoints(entries, opts.weights, opts.fp16 or opts.strip_heads, opts.check_images,
                              opts.progress)
    store_items = check_stores(opts.store, opts.index_store, opts.tracks, plans, warnings)
    wheels = kwheels.resolve(opts.wheel_requirements or kwheels.default_requirements(), opts.wheel_dirs,
                             opts.allow_download)
    # Kaggle's dataset limits, on what is known before writing (the staged folder is checked again, exactly)
    limits.check_upload(ship.least_upload(plans, store_items, opts.train_labels, wheels,
                                          copies_checkpoints=not (opts.fp16 or opts.strip_heads)), at_least=True)
    return CheckedInputs(manifest, plans, store_items, labels_rows, wheels, warnings)


# ------------------------------------------------------------------------------------------ phase 2

def git_state() -> str:
    try:
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "not a git checkout"
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "kernel"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def write_dataset_metadata(dataset: Path, opts: BundleOptions, plans: list[ModelPlan], rows: list[dict]) -> dict:
    """``BUILD.json`` (build id = hash of every file's sha256, the file list the notebook verifies) and
    ``dataset-metadata.json``; returns what ``BUILD.json`` holds."""
    files = kreport.file_table(dataset, exclude={"BUILD.json", "dataset-metadata.json"}, progress=opts.progress)
    build = {
        "build_id": hashlib.sha256("".join(f"{k} {v['sha256']}\n" for k, v in files.items()).encode()).hexdigest()[:12],
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "kernel_source": git_state(), "tracks": opts.tracks, "models": [p.entry["name"] for p in plans],
        "fp16": opts.fp16, "strip_heads": opts.strip_heads, "fp16_tolerance": opts.fp16_tolerance,
        "checkpoints": rows, "files": files}
    ship.write_json(dataset / "BUILD.json", build)
    ship.write_json(dataset / "dataset-metadata.json",
                    {"title": opts.title, "id": opts.dataset_id, "licenses": [{"name": opts.license_name}]})
    return build


def write_notebooks(staging: Path, opts: BundleOptions, build_id: str, rows: list[dict], plans: list[ModelPlan],
                    store_kinds=()) -> list[dict]:
    """One notebook (or script) folder per track under ``staging/notebook``, with its ``kernel-metadata.json``;
    ``store_kinds``: the stores shipped ("store", "index-store"). Returns the report rows."""
    tracks, nb_rows = opts.tracks, []
    pins = {r["checkpoint"]: r["sha256"] for r in rows}
    for t in tracks:
        folder = staging / "notebook" / (t if len(tracks) > 1 else "")
        kslug, ktitle = kernel_slug(opts.slug, t), f"{opts.slug} {t}"
        code_file = f"{kslug}.py" if opts.headless else f"{kslug}.ipynb"
        config = notebook.config_cell(
            t, opts.slug, build_id, pins, "store" if "store" in store_kinds else None,
            "index-store" if "index-store" in store_kinds else None,
            "train.csv" if opts.train_labels is not None else None, opts.deadline_hours, opts.predict_args,
            opts.accelerator)
        track_models = [p.entry["name"] for p in plans if t in p.entry["tracks"]]
        cell_list = notebook.cells(config, notebook.intro(t, ktitle, opts.slug, build_id, track_models))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / code_file).write_text(notebook.to_script(cell_list) if opts.headless
                                        else notebook.to_ipynb(cell_list))
        meta = notebook.kernel_metadata(opts.user, kslug, ktitle, code_file, opts.dataset_id, t, opts.headless,
                                        opts.private, opts.accelerator)
        ship.write_json(folder / "kernel-metadata.json", meta)
        nb_rows.append({"folder": str(opts.out / folder.relative_to(staging)), "code_file": code_file,
                        "id": meta["id"], "kernel_type": meta["kernel_type"], "competition": notebook.COMPETITIONS[t],
                        "models": track_models})
    return nb_rows


def stage(opts: BundleOptions, checked: CheckedInputs, staging: Path) -> dict:
    """Phase 2: the dataset and notebook(s) written into ``staging``; returns the report (also written there)."""
    dataset = staging / "dataset"
    ship.ship_package(dataset)
    rows = ship.ship_checkpoints(checked.plans, dataset, opts.strip_heads, opts.fp16, opts.fp16_tolerance,
                                 opts.check_images, opts.progress)
    store_rows = ship.ship_stores(checked.store_items, dataset, rows, checked.plans, opts.progress)
    if opts.train_labels is not None:
        shutil.copyfile(opts.train_labels, dataset / "train.csv")
    wheel_rows = ship.ship_wheels(checked.wheels, dataset / "wheels")
    build = write_dataset_metadata(dataset, opts, checked.plans, rows)
    upload = limits.upload_of(dataset)  # what `kaggle datasets create` sends, BUILD.json included
    limits.check_upload(upload)
    log.info("dataset upload: %d files, %d bytes (Kaggle's limits: %d files, %d bytes)", upload.files, upload.bytes,
             limits.MAX_DATASET_FILES, limits.MAX_DATASET_BYTES)
    nb_rows = write_notebooks(staging, opts, build["build_id"], rows, checked.plans, checked.store_items.keys())
    if checked.labels_rows:
        log.info("train labels: %d rows", checked.labels_rows)
    warnings = checked.warnings + [f"wheels/{w['file']} is not pure Python: it installs only on a matching "
                                   "Python/platform" for w in wheel_rows if not w["pure"]]
    files = build["files"]
    report = {
        "build_id": build["build_id"], "created": build["created"], "git": build["kernel_source"],
        "out": str(opts.out), "dataset": str(opts.out / "dataset"), "dataset_id": opts.dataset_id,
        "tracks": opts.tracks, "models": build["models"], "manifest": str(checked.manifest),
        "options": opts.report_options(), "checkpoints": rows, "stores": store_rows,
        "train_labels_rows": checked.labels_rows, "wheels": wheel_rows, "notebooks": nb_rows, "files": files,
        "totals": kreport.totals(files), "total_size": sum(v["size"] for v in files.values()),
        "upload": upload.summary(), "warnings": warnings,
    }
    kreport.write(staging, report)
    return report


# ------------------------------------------------------------------------------------------ phase 3

def make_staging(out: Path) -> Path:
    """A new folder next to ``out`` (same file system, so publishing is one rename), with the usual mode."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the published folder is an ordinary one
    return staging


def publish(staging: Path, out: Path) -> None:
    """``staging`` becomes ``out`` in one rename; an earlier build there is removed afterwards."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_bundle(opts: BundleOptions) -> dict:
    """Build ``opts.out`` (see the module docstring); returns the report (also in ``out/report.json``)."""
    checked = check_inputs(opts)
    staging = make_staging(opts.out)
    try:
        report = stage(opts, checked, staging)
        publish(staging, opts.out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report
