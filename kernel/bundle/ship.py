"""Phase 2 of a build: what goes into the staged dataset (see :mod:`kernel.bundle.build`).

Package source, checkpoints (copied byte for byte, or converted and checked), stores with their prepared
artefacts, wheels; each writer returns the report rows of what it wrote.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kernel import store as kstore
from kernel.bundle import convert, limits, report as kreport
from kernel.bundle.checks import PACKAGE_DIR, ModelPlan, prepared_files
from kernel.errors import KernelError
from kernel.postprocess import prepared
from kernel.rows import npz_member_layout

log = logging.getLogger(__name__)

IGNORED = ("__pycache__", "*.pyc", "*.pyo", ".*")  # never shipped: caches and hidden files
_IGNORE = shutil.ignore_patterns(*IGNORED)


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


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


# ------------------------------------------------------------------------------------------ package

def package_files(package: Path = PACKAGE_DIR) -> list[str]:
    """The files of the ``kernel`` package the dataset ships, relative to the package, sorted: everything
    under it but caches and hidden files (:data:`IGNORED`)."""
    def ignored(rel: Path) -> bool:
        return any(fnmatch.fnmatch(part, pattern) for part in rel.parts for pattern in IGNORED)

    return sorted(p.relative_to(package).as_posix() for p in package.rglob("*")
                  if p.is_file() and not ignored(p.relative_to(package)))


def ship_package(dataset: Path, package: Path = PACKAGE_DIR) -> None:
    """``dataset/kernel/``: the files of :func:`package_files`, and the repository's ``requirements.txt``."""
    for rel in package_files(package):
        dst = dataset / "kernel" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(package / rel, dst)
    requirements = package.parent / "requirements.txt"
    if requirements.is_file():
        shutil.copyfile(requirements, dataset / "requirements.txt")


# ------------------------------------------------------------------------------------------ checkpoints

def checkpoint_row(plan: ModelPlan, dst: Path, sha: str, conv: convert.Conversion) -> dict:
    """The report row of one shipped checkpoint: source and shipped file, what the conversion did."""
    return {"model": plan.entry["name"], "checkpoint": plan.entry["checkpoint"], "source": str(plan.source),
            "source_sha256": plan.source_sha, "source_size": plan.source_size, "sha256": sha,
            "size": dst.stat().st_size, "conversion": conv.describe(),
            "stripped_keys": conv.stripped_keys, "dropped_payload": conv.dropped_payload,
            "fp16_tensors": conv.fp16_tensors, "check": conv.check, "min_cosine": conv.min_cosine,
            "max_abs_diff": conv.max_abs_diff}


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
    return checkpoint_row(plan, dst, sha, conv)


def ship_checkpoints(plans: list[ModelPlan], dataset: Path, strip: bool, fp16: bool, tolerance: float,
                     n_images: int, progress: bool = True) -> list[dict]:
    """Every checkpoint into ``dataset/weights/`` and ``dataset/weights_manifest.json`` with every sha256
    filled in; returns the report rows."""
    rows = []
    with tqdm(total=sum(p.source_size for p in plans), unit="B", unit_scale=True, desc="shipping checkpoints",
              disable=not progress) as bar:
        for plan in plans:
            rows.append(ship_checkpoint(plan, dataset / "weights", strip, fp16, tolerance, n_images, bar))
            plan.reference = None
    shipped_sha = {r["model"]: r["sha256"] for r in rows}
    write_json(dataset / "weights_manifest.json",
               {"models": [{**p.entry, "sha256": shipped_sha[p.entry["name"]]} for p in plans]})
    return rows


# ------------------------------------------------------------------------------------------ stores

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


def ship_stores(store_items: dict, dataset: Path, checkpoint_rows: list[dict], plans: list[ModelPlan],
                progress: bool = True) -> list[dict]:
    """Every checked store (``{kind: (folder, items)}``) into ``dataset/<kind>/``; returns the report rows."""
    shipped_sha = {r["model"]: r["sha256"] for r in checkpoint_rows}
    source_sha = {p.entry["name"]: p.source_sha for p in plans}
    rows = []
    for kind, (src, items) in store_items.items():
        rows += ship_store(items, kind, dataset, shipped_sha, source_sha, src, progress)
    return rows


def ship_prepared(src_store: Path, dst_store: Path) -> list[dict]:
    """Copy the store's prepared artefacts; predict uses each one only where its fingerprint matches."""
    rows = []
    for p in prepared_files(src_store):
        dst = prepared.prepared_dir(dst_store) / p.name
        copy_hashed(p, dst)
        (ids,) = prepared.load_arrays(p, "ids")
        with np.load(p, allow_pickle=False) as z:
            layout = npz_member_layout(p, "embeddings.npy") if "embeddings" in z.files else None
        rows.append({"path": dst.relative_to(dst_store.parent).as_posix(), "model": None, "split": "prepared",
                     "rows": len(ids), "dim": layout[2][1] if layout else 0, "size": dst.stat().st_size})
    return rows


# ------------------------------------------------------------------------------------------ wheels

def ship_wheels(wheels: list, folder: Path) -> list[dict]:
    """The wheels and their ``requirements.txt`` (``NAME==VERSION`` lines) into ``folder``; report rows."""
    rows = []
    folder.mkdir(parents=True, exist_ok=True)
    for w in wheels:
        dst = folder / w.path.name
        shutil.copyfile(w.path, dst)
        rows.append({"name": w.name, "version": w.version, "file": w.path.name, "source": w.source,
                     "size": dst.stat().st_size, "sha256": kreport.hash_file(dst), "pure": w.pure})
    (folder / "requirements.txt").write_text("".join(f"{w.name}=={w.version}\n" for w in wheels))
    return rows


# ------------------------------------------------------------------------------------------ before writing

def least_upload(plans: list[ModelPlan], store_items: dict, train_labels: Path | None, wheels: list,
                 copies_checkpoints: bool) -> limits.Upload:
    """A lower bound of what the writers above put into the dataset, from the checked inputs alone: the files
    copied byte for byte (package, store splits and prepared artefacts, train labels, wheels) and one file per
    checkpoint, with its bytes only when it is copied unchanged (``copies_checkpoints``)."""
    sizes = {f"kernel/{rel}": (PACKAGE_DIR / rel).stat().st_size for rel in package_files()}
    for plan in plans:
        sizes[f"weights/{plan.entry['checkpoint']}"] = plan.source_size if copies_checkpoints else 0
    for kind, (src, items) in store_items.items():
        for name, _split, path, *_ in items:
            sizes[f"{kind}/{name}/{path.name}"] = path.stat().st_size
        for p in prepared_files(src):
            sizes[f"{kind}/{prepared.PREPARED}/{p.name}"] = p.stat().st_size
    if train_labels is not None:
        sizes["train.csv"] = Path(train_labels).stat().st_size
    for w in wheels:
        sizes[f"wheels/{w.path.name}"] = w.path.stat().st_size
    return limits.Upload(sizes)
