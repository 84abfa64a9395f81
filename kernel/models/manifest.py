"""``weights_manifest.json``: one entry per ensemble member, validated before anything is built.

Format: ``{"models": [entry, ...]}``. An entry is a plain JSON object (a dict everywhere in the package;
docs/architectures.md#the-ensemble gives the values of the nine real ones). Required fields::

    name           str, unique model name (the names of docs/architectures.md#the-ensemble; letters, digits, '_', '.', '-')
    family         "dolg" | "hybrid" | "effnet"; recognition averages the descriptors of a family (docs/postprocessing.md)
    backbone       str, timm model name (for a hybrid: the Swin)
    embedder       str, hybrid only: timm EfficientNet replacing Swin's patch embedding
    feature_level  int 0-4, hybrid only: the embedder's feature level (timm ``out_indices``) fed to the Swin
    dilations      three positive ints, dolg only: the dilations of the multi-atrous local branch
    image_size     int 1-MAX_IMAGE_SIZE, square input size in pixels
    stem_stride    1 or 2 (EfficientNet stem stride)
    tracks         non-empty subset of ["recognition", "retrieval"]
    checkpoint     str, checkpoint file name inside the weights folder (not a path)
    priority       int >= 1; 1 = most valuable; when time runs short models are dropped from the highest down

Optional fields::

    sha256         64 lowercase hex digits, the checkpoint's sha256, or null until pinned
    embedding_dim  int, descriptor width (default 512)
    backbone_args / embedder_args   dict, extra timm keyword arguments (the tiny demo preset uses them)
    local_dim / atrous_dim          int, dolg only: widths of the local branch (default 1024 / 512)
    description    str, free text

Any other field is refused, except ``group`` (:data:`RETIRED`): older manifests carry it; it is accepted,
logged once and ignored.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from kernel.errors import KernelError

log = logging.getLogger(__name__)

FAMILIES = ("dolg", "hybrid", "effnet")
# our reading: the largest input the kernel accepts (the nine models use 384-896, docs/architectures.md#the-ensemble); far beyond it a
# batch of one image no longer fits any accelerator and every image would end as a failure
MAX_IMAGE_SIZE = 2048
TRACKS = ("recognition", "retrieval")
#: the 2021 ensemble as (name, family, tracks): the nine models of weights_manifest.json, eight per track
ENSEMBLE = (
    ("dolg_effnet_b5_768", "dolg", ("recognition", "retrieval")),
    ("dolg_effnet_b6_768", "dolg", ("recognition", "retrieval")),
    ("dolg_effnet_b7_448_s1", "dolg", ("recognition", "retrieval")),
    ("hybrid_b3_swin224_896", "hybrid", ("recognition", "retrieval")),
    ("hybrid_b5_swin224_448_s1", "hybrid", ("recognition", "retrieval")),
    ("hybrid_b6_swin384_384", "hybrid", ("recognition", "retrieval")),
    ("effnet_b3_768", "effnet", ("recognition",)),
    ("effnet_b6_512", "effnet", ("recognition", "retrieval")),
    ("effnet_b5_704", "effnet", ("retrieval",)),
)

_COMMON = {
    "name": str,
    "family": str,
    "backbone": str,
    "image_size": int,
    "stem_stride": int,
    "tracks": list,
    "checkpoint": str,
    "priority": int,
}
_FAMILY_FIELDS = {"dolg": {"dilations": list}, "hybrid": {"embedder": str, "feature_level": int}, "effnet": {}}
_OPTIONAL = {"sha256": (str, type(None)), "backbone_args": dict, "embedder_args": dict, "embedding_dim": int,
             "local_dim": int, "atrous_dim": int, "description": str}
#: fields older manifests carry that nothing reads any more -> why; accepted, logged once, dropped
RETIRED = {"group": "recognition averages descriptors by 'family'"}


def _fail(where: str, name: str, field: str, why: str):
    raise KernelError(f"{where}: model '{name}': field '{field}' {why}")


def validate_entry(entry, where: str = "manifest") -> dict:
    """Check one entry; raises :class:`KernelError` naming the entry and the field."""
    if not isinstance(entry, dict):
        raise KernelError(f"{where}: every entry of 'models' must be an object, got {type(entry).__name__}")
    name = entry.get("name", "<unnamed>")
    family = entry.get("family")
    if family not in FAMILIES:
        _fail(where, name, "family", f"must be one of {', '.join(FAMILIES)} (got {family!r})")
    fields = {**_COMMON, **_FAMILY_FIELDS[family]}
    for field, typ in fields.items():
        if field not in entry:
            _fail(where, name, field, "is missing")
        value = entry[field]
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            _fail(where, name, field, f"must be {typ.__name__} (got {value!r})")
    for field, typ in _OPTIONAL.items():
        if field in entry and not isinstance(entry[field], typ):
            _fail(where, name, field, f"has the wrong type (got {entry[field]!r})")
    known = set(fields) | set(_OPTIONAL) | set(RETIRED)
    unknown = sorted(set(entry) - known)
    if unknown:
        _fail(where, name, unknown[0], "is not a known manifest field")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        _fail(where, name, "name", "may only hold letters, digits, '_', '.', '-'")
    if not 0 < entry["image_size"] <= MAX_IMAGE_SIZE:
        _fail(where, name, "image_size", f"must be between 1 and {MAX_IMAGE_SIZE} pixels (got {entry['image_size']})")
    if entry["stem_stride"] not in (1, 2):
        _fail(where, name, "stem_stride", "must be 1 or 2")
    if entry["priority"] < 1:
        _fail(where, name, "priority", "must be >= 1")
    if not entry["tracks"] or any(t not in TRACKS for t in entry["tracks"]):
        _fail(where, name, "tracks", f"must be a non-empty subset of {list(TRACKS)}")
    if family == "dolg":
        d = entry["dilations"]
        if len(d) != 3 or not all(isinstance(x, int) and x > 0 for x in d):
            _fail(where, name, "dilations", "must be three positive integers")
    if family == "hybrid" and not 0 <= entry["feature_level"] <= 4:
        _fail(where, name, "feature_level", "must be between 0 and 4")
    sha = entry.get("sha256")
    if sha is not None and not re.fullmatch(r"[0-9a-f]{64}", sha):
        _fail(where, name, "sha256", "must be 64 lowercase hex digits or null")
    if "/" in entry["checkpoint"] or "\\" in entry["checkpoint"]:
        _fail(where, name, "checkpoint", "must be a file name inside the weights folder, not a path")
    return entry


def validate_manifest(data, where: str = "manifest") -> list[dict]:
    """Check every entry (:func:`validate_entry`) and the list; returns the entries without
    :data:`RETIRED` fields."""
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise KernelError(f"{where}: expected an object with a 'models' list")
    entries = [validate_entry(e, where) for e in data["models"]]
    entries = _drop_retired(entries, where)
    names = [e["name"] for e in entries]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise KernelError(f"{where}: model '{dup[0]}' appears more than once")
    if not entries:
        raise KernelError(f"{where}: 'models' is empty")
    return entries


def _drop_retired(entries: list[dict], where: str) -> list[dict]:
    for field, why in RETIRED.items():
        if any(field in e for e in entries):
            log.info("%s: field '%s' is no longer used (%s); ignored", where, field, why)
    return [{k: v for k, v in e.items() if k not in RETIRED} for e in entries]


def load_manifest(path: str | Path) -> list[dict]:
    """Read and validate a manifest file; returns its entries."""
    path = Path(path)
    if not path.is_file():
        raise KernelError(f"{path}: manifest not found")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise KernelError(f"{path}: not valid JSON ({exc})") from None
    return validate_manifest(data, str(path))


def select(entries: list[dict], names=None, track: str | None = None) -> list[dict]:
    """Entries for a track and/or an explicit comma-separated list (or list) of names, manifest order kept."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if names:
        known = {e["name"] for e in entries}
        missing = [n for n in names if n not in known]
        if missing:
            raise KernelError(f"unknown model '{missing[0]}' (manifest has: {', '.join(sorted(known))})")
        entries = [e for e in entries if e["name"] in names]
    if track is not None:
        entries = [e for e in entries if track in e["tracks"]]
    return entries
