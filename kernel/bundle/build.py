"""From checkpoints to an uploadable Kaggle dataset and notebook, in three phases.

1. *Validate* everything, writing nothing: the Kaggle ids, the manifest and the model selection (unknown model
   names, models outside the track), every checkpoint (present, sha256 as pinned, loads strictly into its
   manifest entry), the descriptor stores (complete splits, ``meta.json`` naming the same checkpoint), the train
   labels, the wheels, the output folder. Any problem raises :class:`KernelError` naming it.
2. *Stage* the dataset and notebook(s) in a temporary folder next to ``out``: package source, checkpoints
   (copied byte for byte, or converted and checked on real descriptors, see :mod:`kernel.bundle.convert`),
   manifest with every sha256 filled in, stores, labels, wheels, ``BUILD.json`` (the file list the notebook
   verifies), ``dataset-metadata.json``, the notebook with its ``kernel-metadata.json``, the report.
3. *Publish*: the staging folder replaces ``out`` in one rename (a previous build there is removed). A crash
   or an error before that leaves ``out`` as it was.

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
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

import kernel
from kernel import store as kstore
from kernel.postprocess import prepared
from kernel.rows import SplitRows, npz_member_layout
from kernel.bundle import convert, notebook, report as kreport, wheels as kwheels
from kernel.errors import KernelError

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(kernel.__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
DEFAULT_SLUG = "glr2021-kernel"
DEFAULT_DEADLINE_HOURS = 11.5
REFERENCE_SPLITS = ("train", "nonlandmark", "index")  # what a store may ship (never test descriptors)
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".*")


@dataclass
class ModelPlan:
    entry: dict
    source: Path
    source_sha: str
    source_size: int
    reference: object = None  # descriptors (torch) of the check images, only when converting


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


# ------------------------------------------------------------------------------------------ phase 1

def resolve_manifest(weights: Path, manifest) -> Path:
    if manifest is not None:
        return Path(manifest)
    inside = weights / "weights_manifest.json"
    return inside if inside.is_file() else REPO_ROOT / "weights_manifest.json"


def select_models(entries: list[dict], names, tracks: list[str], manifest: Path) -> list[dict]:
    from kernel.models import select

    chosen = select(entries, names)  # unknown names raise, naming the manifest's models
    if names:
        for e in chosen:
            if not set(e["tracks"]) & set(tracks):
                raise KernelError(f"model '{e['name']}' serves {', '.join(e['tracks'])}, not the "
                                  f"{' or '.join(tracks)} track")
    chosen = [e for e in chosen if set(e["tracks"]) & set(tracks)]
    for t in tracks:
        if not any(t in e["tracks"] for e in chosen):
            raise KernelError(f"{manifest}: no selected model serves the {t} track")
    return chosen


def check_checkpoint(entry: dict, weights: Path, converting: bool, n_images: int, bar) -> ModelPlan:
    """Present, sha256 as pinned, loads strictly into its entry; reference descriptors when converting."""
    from kernel.models import build_model, load_weights

    name, path = entry["name"], weights / entry["checkpoint"]
    if not path.is_file():
        raise KernelError(f"model '{name}': checkpoint {path} not found")
    digest = kreport.hash_file(path, bar)
    if entry.get("sha256") and entry["sha256"] != digest:
        raise KernelError(f"model '{name}': {path} has sha256 {digest[:16]}..., the manifest pins "
                          f"{entry['sha256'][:16]}... (wrong or modified file)")
    model = build_model(entry)
    # strict: raises CheckpointError naming model, file and keys; full unpickling only for a pinned file
    load_weights(model, path, name, trusted=bool(entry.get("sha256")))
    plan = ModelPlan(entry, path, digest, path.stat().st_size)
    if converting:
        plan.reference = convert.descriptors(model, convert.check_images(entry["image_size"], n_images))
    log.info("checked %s: %s loads, sha256 %s...", name, path.name, digest[:16])
    return plan


def check_store(store: Path, kind: str, plans: list[ModelPlan], warnings: list[str]) -> list[tuple]:
    """The splits of a descriptor store to ship: ``[(model, split, path, rows, dim, meta), ...]``."""
    if not store.is_dir():
        raise KernelError(f"--{kind} {store}: descriptor store not found")
    splits = ("index",) if kind == "index-store" else REFERENCE_SPLITS
    shipped = []
    for plan in plans:
        name = plan.entry["name"]
        folder = store / name
        if not folder.is_dir():
            warnings.append(f"{kind} {store} has no descriptors of '{name}': predict extracts them from the "
                            "competition folder at run time")
            continue
        meta = kstore.read_meta(store, name)
        if meta.get("sha256") is None:
            raise KernelError(f"{folder / kstore.META}: no sha256: cannot tell which checkpoint computed "
                              f"these descriptors of '{name}'")
        if meta["sha256"] != plan.source_sha:
            raise KernelError(f"{folder / kstore.META}: descriptors of '{name}' were computed with checkpoint "
                              f"sha256 {meta['sha256'][:16]}..., {plan.source} has {plan.source_sha[:16]}...")
        if meta.get("image_size") not in (None, plan.entry["image_size"]):
            raise KernelError(f"{folder / kstore.META}: image_size {meta['image_size']}, the manifest says "
                              f"{plan.entry['image_size']} for '{name}'")
        for split in splits:
            if not kstore.has_split(store, name, split):
                if kstore.parts_dir(store, name, split).is_dir():
                    raise KernelError(f"{kstore.parts_dir(store, name, split)}: extraction of '{name}' {split} "
                                      "is not finished (shards only): finish it or remove the folder")
                continue
            dim = plan.entry.get("embedding_dim", 512)
            rows = SplitRows(kstore.split_path(store, name, split), dim=dim)
            for _ in rows.blocks(1 << 16):  # every row finite, read a block at a time (splits can be GBs)
                pass
            shipped.append((name, split, kstore.split_path(store, name, split), len(rows), dim, meta))
        others = sorted(p.name for p in folder.glob("*.npz") if p.stem not in splits)
        if others:
            warnings.append(f"{kind} {folder}: not shipped: {', '.join(others)} (only {', '.join(splits)})")
    return shipped


def check_stores(store, index_store, tracks: list[str], plans: list[ModelPlan], warnings: list[str]) -> dict:
    """``{"store"|"index-store": (folder, items)}`` for the stores given; the retrieval track needs every
    model's train descriptors precomputed (its competition folder has index/ and test/ only)."""
    items = {}
    for kind, folder in (("store", store), ("index-store", index_store)):
        if folder is not None:
            items[kind] = (Path(folder), check_store(Path(folder), kind, plans, warnings))
            check_prepared(Path(folder), warnings)
    stored = {(it[0], it[1]) for it in items.get("store", (None, []))[1]}
    if "retrieval" in tracks:
        lacking = [p.entry["name"] for p in plans
                   if "retrieval" in p.entry["tracks"] and (p.entry["name"], "train") not in stored]
        if lacking:
            raise KernelError(f"retrieval track: no precomputed train descriptors of {', '.join(lacking)} in "
                              f"--store {store or '(none given)'}; the retrieval competition has no train images to "
                              "extract them from (python -m kernel extract --split train first)")
        if index_store is None and not any(split == "index" for _, split in stored):
            warnings.append("no precomputed index descriptors: the retrieval notebook extracts all index images "
                            "at run time")
    if store is None:
        warnings.append("no --store: every train descriptor is extracted on Kaggle at run time, which only fits "
                        "the 12 h for a small train set")
    return items


def check_train_labels(path: Path) -> int:
    import csv

    if not path.is_file():
        raise KernelError(f"--train-labels {path}: file not found")
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"id", "landmark_id"} <= set(reader.fieldnames):
                raise KernelError(f"{path}: columns 'id' and 'landmark_id' are required (has {reader.fieldnames})")
            rows = 0
            for row in reader:
                if not row["landmark_id"].strip().lstrip("-").isdigit():
                    raise KernelError(f"{path}: line {rows + 2}: landmark_id {row['landmark_id']!r} is not an integer")
                rows += 1
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise KernelError(f"{path}: cannot read ({exc})") from None
    if rows == 0:
        raise KernelError(f"{path}: no rows")
    return rows


def check_out(out: Path, inputs=()) -> None:
    """An earlier build or a new/empty folder, outside the package it ships and every input of the build."""
    from kernel.cli import output_dir

    output_dir(out, "--out", inputs=(PACKAGE_DIR, *inputs))
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "report.json").is_file())):
        raise KernelError(f"--out {out}: exists and is not an earlier build (no report.json): remove it or "
                          "choose another folder")


# ------------------------------------------------------------------------------------------ phase 2

def copy_hashed(src: Path, dst: Path, bar=None) -> str:
    """Copy a file in chunks (progress on ``bar``); returns the sha256 of what was written."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while block := fi.read(1 << 22):
            fo.write(block)
            h.update(block)
            if bar is not None:
                bar.update(len(block))
    return h.hexdigest()


def copy_checked(src: Path, dst: Path, expected_sha: str, bar) -> str:
    """Copy a file; raises when the copy differs from the source as it was checked."""
    if copy_hashed(src, dst, bar) != expected_sha:
        raise KernelError(f"{src}: changed since it was checked (sha256 differs from {expected_sha[:16]}...)")
    return expected_sha


def ship_checkpoint(plan: ModelPlan, weights_out: Path, strip: bool, fp16: bool, tolerance: float,
                    n_images: int, bar) -> dict:
    """Write one checkpoint into the dataset (unchanged or converted and checked); returns its report row."""
    import torch

    from kernel.models import load_model, read_checkpoint

    entry, dst = plan.entry, weights_out / plan.entry["checkpoint"]
    obj = read_checkpoint(plan.source, trusted=bool(entry.get("sha256"))) if (strip or fp16) else None
    new, conv = convert.convert_checkpoint(obj, strip, fp16) if obj is not None else (None, convert.Conversion())
    del obj
    if new is None:
        sha = copy_checked(plan.source, dst, plan.source_sha, bar)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        torch.save(new, dst)
        del new
        sha = kreport.hash_file(dst)
        bar.update(plan.source_size)
        # the shipped file itself, through the kernel's own loader, against the original's descriptors
        model = load_model({**entry, "sha256": sha}, weights_out)
        got = convert.descriptors(model, convert.check_images(entry["image_size"], n_images))
        convert.compare(entry["name"], plan.reference, got, conv, tolerance)
    log.info("%s: %s", entry["name"], conv.describe())
    return {"model": entry["name"], "checkpoint": entry["checkpoint"], "source": str(plan.source),
            "source_sha256": plan.source_sha, "source_size": plan.source_size, "sha256": sha,
            "size": dst.stat().st_size, "conversion": conv.describe(),
            "stripped_keys": conv.stripped_keys, "dropped_payload": conv.dropped_payload,
            "fp16_tensors": conv.fp16_tensors, "check": conv.check, "min_cosine": conv.min_cosine,
            "max_abs_diff": conv.max_abs_diff}


def ship_store(items: list[tuple], kind: str, dataset: Path, shipped_sha: dict, source_sha: dict,
               src_store: Path, progress: bool = True) -> list[dict]:
    """Copy store splits; ``meta.json`` names the shipped checkpoint (and the one that computed them)."""
    rows, metas = [], {}
    total = sum(path.stat().st_size for _, _, path, *_ in items)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"shipping {kind}", disable=not progress) as bar:
        for name, split, path, n, dim, meta in items:
            dst = dataset / kind / name / path.name
            copy_hashed(path, dst, bar)
            metas[name] = meta
            rows.append({"path": dst.relative_to(dataset).as_posix(), "model": name, "split": split, "rows": n,
                         "dim": dim, "size": dst.stat().st_size})
    for name, meta in metas.items():
        new = dict(meta, sha256=shipped_sha[name])
        if shipped_sha[name] != source_sha[name]:
            new["computed_with_sha256"] = source_sha[name]
        kstore.write_meta(dataset / kind, name, new)
    failures = src_store / kstore.FAILURES_DIR
    if failures.is_dir() and metas:
        shutil.copytree(failures, dataset / kind / kstore.FAILURES_DIR, ignore=_IGNORE)
    return rows + ship_prepared(src_store, dataset / kind)


def _prepared_files(src_store: Path) -> list[Path]:
    """The store's prepared artefacts (``python -m kernel prepare``): ``.npz`` files with a fingerprint."""
    src = prepared.prepared_dir(src_store)
    return sorted(p for p in src.glob("*.npz") if prepared.read_fingerprint(p) is not None) if src.is_dir() else []


def check_prepared(src_store: Path, warnings: list[str]) -> None:
    if not _prepared_files(src_store):
        warnings.append(f"{src_store}: no prepared artefacts (python -m kernel prepare): predict computes the "
                        "index k-NN labels / B(t) on Kaggle, once per run")


def ship_prepared(src_store: Path, dst_store: Path) -> list[dict]:
    """Copy the store's prepared artefacts; predict uses each one only where its fingerprint matches."""
    found = _prepared_files(src_store)
    rows = []
    for p in found:
        dst = prepared.prepared_dir(dst_store) / p.name
        copy_hashed(p, dst)
        (ids,) = prepared.load_arrays(p, "ids")
        with np.load(p, allow_pickle=False) as z:
            layout = npz_member_layout(p, "embeddings.npy") if "embeddings" in z.files else None
        rows.append({"path": dst.relative_to(dst_store.parent).as_posix(), "model": None, "split": "prepared",
                     "rows": len(ids), "dim": layout[2][1] if layout else 0, "size": dst.stat().st_size})
    return rows


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


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_notebooks(staging: Path, out: Path, tracks: list[str], user: str, slug: str, build_id: str,
                    rows: list[dict], plans: list[ModelPlan], headless: bool, private: bool,
                    deadline_hours: float, predict_args, store, index_store, train_labels,
                    accelerator: str = "t4x2") -> list[dict]:
    """One notebook (or script) folder per track, with its ``kernel-metadata.json``; returns report rows."""
    nb_rows = []
    for t in tracks:
        folder = staging / "notebook" / (t if len(tracks) > 1 else "")
        kslug, ktitle = kernel_slug(slug, t), f"{slug} {t}"
        code_file = f"{kslug}.py" if headless else f"{kslug}.ipynb"
        config = notebook.config_cell(t, slug, build_id, {r["checkpoint"]: r["sha256"] for r in rows}, store,
                                      index_store, train_labels, deadline_hours, predict_args, accelerator)
        track_models = [p.entry["name"] for p in plans if t in p.entry["tracks"]]
        cell_list = notebook.cells(config, notebook.intro(t, ktitle, slug, build_id, track_models))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / code_file).write_text(notebook.to_script(cell_list) if headless else notebook.to_ipynb(cell_list))
        meta = notebook.kernel_metadata(user, kslug, ktitle, code_file, f"{user}/{slug}", t, headless, private,
                                        accelerator)
        write_json(folder / "kernel-metadata.json", meta)
        nb_rows.append({"folder": str(out / folder.relative_to(staging)), "code_file": code_file, "id": meta["id"],
                        "kernel_type": meta["kernel_type"], "competition": notebook.COMPETITIONS[t],
                        "models": track_models})
    return nb_rows


# ------------------------------------------------------------------------------------------ the build

def build_bundle(
    weights,
    out,
    user: str,
    manifest=None,
    slug: str = DEFAULT_SLUG,
    title: str | None = None,
    track: str = "recognition",
    models=None,
    store=None,
    index_store=None,
    train_labels=None,
    headless: bool = False,
    fp16: bool = False,
    strip_heads: bool = True,
    fp16_tolerance: float = convert.DEFAULT_FP16_TOLERANCE,
    check_images: int = 4,
    wheel_requirements=None,
    wheel_dirs=(),
    allow_download: bool = True,
    license_name: str = "other",
    deadline_hours: float = DEFAULT_DEADLINE_HOURS,
    predict_args=(),
    private: bool = True,
    progress: bool = True,
    accelerator: str = "t4x2",
) -> dict:
    """Build ``out/`` (see the module docstring); returns the report (also in ``out/report.json``)."""
    weights, out = Path(weights), Path(out)
    tracks = tracks_of(track)
    title = title or f"{slug} bundle"
    check_identity(user, slug, title, tracks)
    if not 0 < fp16_tolerance <= 1:
        raise KernelError(f"--fp16-tolerance must be in (0, 1] (got {fp16_tolerance})")
    if not 1 <= check_images <= len(list(convert.SAMPLE_DIR.glob("*.jpg"))):
        raise KernelError(f"--check-images must be between 1 and the {len(list(convert.SAMPLE_DIR.glob('*.jpg')))} "
                          "bundled photos")
    if not 0 < deadline_hours <= 12:
        raise KernelError(f"--deadline-hours must be in (0, 12] (Kaggle's limit; got {deadline_hours})")
    if not weights.is_dir():
        raise KernelError(f"--weights {weights}: folder not found")
    check_out(out, (weights, manifest, store, index_store, train_labels))
    warnings: list[str] = notebook.check_accelerator(accelerator)

    # ---- phase 1: validate, write nothing
    from kernel.models import load_manifest

    manifest = resolve_manifest(weights, manifest)
    entries = select_models(load_manifest(manifest), models, tracks, manifest)
    if "retrieval" in tracks and train_labels is None:
        raise KernelError("the retrieval competition has no train.csv: pass --train-labels (id,landmark_id of "
                          "the train images the descriptors were computed on) so the dataset ships one")
    labels_rows = check_train_labels(Path(train_labels)) if train_labels is not None else 0
    converting = fp16 or strip_heads
    total = sum((weights / e["checkpoint"]).stat().st_size for e in entries if (weights / e["checkpoint"]).is_file())
    with tqdm(total=total, unit="B", unit_scale=True, desc="checking checkpoints", disable=not progress) as bar:
        plans = [check_checkpoint(e, weights, converting, check_images, bar) for e in entries]
    store_items = check_stores(store, index_store, tracks, plans, warnings)
    wheels = kwheels.resolve(wheel_requirements or kwheels.default_requirements(), wheel_dirs, allow_download)

    # ---- phase 2: stage
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the published folder is an ordinary one
    try:
        dataset = staging / "dataset"
        shutil.copytree(PACKAGE_DIR, dataset / "kernel", ignore=_IGNORE)
        if (REPO_ROOT / "requirements.txt").is_file():
            shutil.copyfile(REPO_ROOT / "requirements.txt", dataset / "requirements.txt")
        rows = []
        with tqdm(total=sum(p.source_size for p in plans), unit="B", unit_scale=True, desc="shipping checkpoints",
                  disable=not progress) as bar:
            for plan in plans:
                rows.append(ship_checkpoint(plan, dataset / "weights", strip_heads, fp16, fp16_tolerance,
                                            check_images, bar))
                plan.reference = None
        shipped_sha = {r["model"]: r["sha256"] for r in rows}
        source_sha = {p.entry["name"]: p.source_sha for p in plans}
        write_json(dataset / "weights_manifest.json",
                   {"models": [{**p.entry, "sha256": shipped_sha[p.entry["name"]]} for p in plans]})
        store_rows = []
        for kind, (src, items) in store_items.items():
            store_rows += ship_store(items, kind, dataset, shipped_sha, source_sha, src, progress)
        if train_labels is not None:
            shutil.copyfile(train_labels, dataset / "train.csv")
        wheel_rows = []
        for w in wheels:
            dst = dataset / "wheels" / w.path.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(w.path, dst)
            wheel_rows.append({"name": w.name, "version": w.version, "file": w.path.name, "source": w.source,
                               "size": dst.stat().st_size, "sha256": kreport.hash_file(dst), "pure": w.pure})
        (dataset / "wheels" / "requirements.txt").write_text("".join(f"{w.name}=={w.version}\n" for w in wheels))

        files = kreport.file_table(dataset, exclude={"BUILD.json", "dataset-metadata.json"}, progress=progress)
        build_id = hashlib.sha256("".join(f"{k} {v['sha256']}\n" for k, v in files.items()).encode()).hexdigest()[:12]
        created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        source = git_state()
        dataset_id = f"{user}/{slug}"
        names = [p.entry["name"] for p in plans]
        write_json(dataset / "BUILD.json", {
            "build_id": build_id, "created": created, "kernel_source": source, "tracks": tracks,
            "models": names, "fp16": fp16, "strip_heads": strip_heads, "fp16_tolerance": fp16_tolerance,
            "checkpoints": rows, "files": files})
        write_json(dataset / "dataset-metadata.json",
                   {"title": title, "id": dataset_id, "licenses": [{"name": license_name}]})

        nb_rows = write_notebooks(
            staging, out, tracks, user, slug, build_id, rows, plans, headless, private, deadline_hours,
            predict_args, store="store" if "store" in store_items else None,
            index_store="index-store" if "index-store" in store_items else None,
            train_labels="train.csv" if train_labels is not None else None, accelerator=accelerator)
        if labels_rows:
            log.info("train labels: %d rows", labels_rows)
        for w in wheel_rows:
            if not w["pure"]:
                warnings.append(f"wheels/{w['file']} is not pure Python: it installs only on a matching "
                                "Python/platform")
        report = {
            "build_id": build_id, "created": created, "git": source, "out": str(out),
            "dataset": str(out / "dataset"), "dataset_id": dataset_id, "tracks": tracks, "models": names,
            "manifest": str(manifest), "options": {"fp16": fp16, "strip_heads": strip_heads,
                                                   "fp16_tolerance": fp16_tolerance, "check_images": check_images,
                                                   "headless": headless, "deadline_hours": deadline_hours,
                                                   "accelerator": accelerator},
            "checkpoints": rows, "stores": store_rows, "train_labels_rows": labels_rows, "wheels": wheel_rows,
            "notebooks": nb_rows, "files": files, "totals": kreport.totals(files),
            "total_size": sum(v["size"] for v in files.values()), "warnings": warnings,
        }
        kreport.write(staging, report)

        # ---- phase 3: publish in one rename
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
        staging.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report
