"""Phase 1 of a build: every input checked, nothing written (see :mod:`kernel.bundle.build`).

Each check raises :class:`KernelError` naming the file and the problem; the non-fatal findings are appended
to the build's ``warnings`` (they end up in the report).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import kernel
from kernel import store as kstore
from kernel.bundle import convert, report as kreport
from kernel.bundle.notebook import COMPETITIONS
from kernel.errors import KernelError
from kernel.postprocess import prepared
from kernel.rows import SplitRows

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(kernel.__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
REFERENCE_SPLITS = ("train", "nonlandmark", "index")  # what a store may ship (never test descriptors)


@dataclass
class ModelPlan:
    """One checked model: its manifest entry and the checkpoint file as it was checked."""

    entry: dict  # the manifest entry
    source: Path  # the checkpoint file
    source_sha: str  # its sha256 when checked
    source_size: int  # its size in bytes
    reference: object = None  # descriptors (torch) of the check images, only when converting


def resolve_manifest(weights: Path, manifest) -> Path:
    """``manifest`` when given, else ``weights/weights_manifest.json``, else the repository's."""
    if manifest is not None:
        return Path(manifest)
    inside = weights / "weights_manifest.json"
    return inside if inside.is_file() else REPO_ROOT / "weights_manifest.json"


def select_models(entries: list[dict], names, tracks: list[str], manifest: Path) -> list[dict]:
    """The entries to ship: the named ones (all when ``names`` is empty) serving one of ``tracks``.

    An unknown name, a named model outside the tracks, or a track no model serves raises."""
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


def _check_store_meta(store: Path, plan: ModelPlan) -> dict:
    """The ``meta.json`` of one model's descriptors, which must name the checked checkpoint."""
    name, folder = plan.entry["name"], store / plan.entry["name"]
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
    return meta


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
        meta = _check_store_meta(store, plan)
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


def prepared_files(src_store: Path) -> list[Path]:
    """The store's prepared artefacts (``python -m kernel prepare``): ``.npz`` files with a fingerprint."""
    src = prepared.prepared_dir(src_store)
    return sorted(p for p in src.glob("*.npz") if prepared.read_fingerprint(p) is not None) if src.is_dir() else []


def check_prepared(src_store: Path, warnings: list[str]) -> None:
    """A warning when the store has no prepared artefacts (predict then computes them on Kaggle)."""
    if not prepared_files(src_store):
        warnings.append(f"{src_store}: no prepared artefacts (python -m kernel prepare): predict computes the "
                        "index k-NN labels / B(t) on Kaggle, once per run")


def check_train_labels(path: Path) -> int:
    """The number of rows of the train labels to ship, read and checked by :mod:`kernel.labels` (the rules
    ``predict`` applies): a bad row raises naming the file and the line."""
    from kernel.labels import read_train_labels

    path = Path(path)
    if not path.is_file():
        raise KernelError(f"--train-labels {path}: file not found")
    rows = len(read_train_labels(path))
    if rows == 0:
        raise KernelError(f"{path}: no rows")
    return rows


def check_labels_for(tracks: list[str], train_labels, warnings: list[str] | None = None) -> int:
    """The retrieval track needs train labels (its competition has no ``train.csv``); rows of those given.
    A recognition build without them is logged as a warning (appended to ``warnings``): the notebook then
    relies on the competition's ``train.csv`` at run time."""
    if "retrieval" in tracks and train_labels is None:
        raise KernelError("the retrieval competition has no train.csv: pass --train-labels (id,landmark_id of "
                          "the train images the descriptors were computed on) so the dataset ships one")
    if train_labels is None:
        text = (f"recognition track without --train-labels: the dataset ships no train.csv, so on Kaggle the notebook "
                f"relies on the competition's own /kaggle/input/{COMPETITIONS['recognition']}/train.csv at run time, "
                "and every shipped train descriptor needs its id there; pass --train-labels to ship the "
                "labels the descriptors were computed with")
        log.warning(text)
        if warnings is not None:
            warnings.append(text)
        return 0
    return check_train_labels(train_labels)


#: what a build writes into ``--out`` (see kernel.bundle.build): all that a rebuild may replace
BUILD_ENTRIES = frozenset({"dataset", "notebook", "report.json", "report.txt"})


def check_out(out: Path, inputs=()) -> None:
    """An earlier build or a new/empty folder, outside the package it ships and every input of the build."""
    from kernel.cli import output_dir

    output_dir(out, "--out", inputs=(PACKAGE_DIR, *inputs))
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "report.json").is_file())):
        raise KernelError(f"--out {out}: exists and is not an earlier build (no report.json): remove it or "
                          "choose another folder")
    # an earlier build is replaced whole: anything else in the folder would be deleted with it
    others = sorted(p.name for p in out.iterdir() if p.name not in BUILD_ENTRIES) if out.is_dir() else []
    if others:
        raise KernelError(f"--out {out}: holds {', '.join(others[:5])}{' ...' if len(others) > 5 else ''} besides "
                          "an earlier build, which replacing the build would delete: move them or choose another folder")


def check_checkpoints(entries: list[dict], weights: Path, converting: bool, n_images: int,
                      progress: bool = True) -> list[ModelPlan]:
    """:func:`check_checkpoint` for every entry, one progress bar over all their bytes."""
    from tqdm import tqdm

    total = sum((weights / e["checkpoint"]).stat().st_size for e in entries if (weights / e["checkpoint"]).is_file())
    with tqdm(total=total, unit="B", unit_scale=True, desc="checking checkpoints", disable=not progress) as bar:
        return [check_checkpoint(e, weights, converting, n_images, bar) for e in entries]
