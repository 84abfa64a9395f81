"""Split views: a reference split as the competition has it *now*, read from the shipped descriptors in place.

Kaggle scores a notebook by rerunning it on hidden data, and the rerun's reference folders are not the public
ones: the 2021 recognition rerun's ``train.csv`` held landmark ids beyond the cleaned set (new landmarks whose
images nobody could precompute) and dropped some public ids; retrieval's hidden index is larger than the public
one (docs/kaggle.md#the-scored-rerun). ``predict`` therefore decides per image, not per split: the shipped
descriptors of the images still present are used as shipped, the images present but not shipped are extracted
at run time into the split ``<split>_added`` of the working store, and the shipped images no longer present
are left out. A view records that decision without copying a byte of the shipped file (13 GB at 1.58 M train
images for the eight models)::

    STORE/<model>/<split>.view.json
        {"format": 1, "base": "/abs/path/of/the/shipped/<model>/<split>.npz", "exclude": [ids left out],
         "added": "<split>_added" or null, "added_exclude": [added ids left out]}

The rows of a view are the base's rows without ``exclude``, in the base's order, then the added split's rows
without ``added_exclude``. Every reader of a store (:func:`kernel.store.has_split`, :func:`kernel.store.load_split`,
:func:`kernel.rows.open_split`, the prepared artefacts' fingerprints) understands views, so post-processing reads
a view exactly as a split file. ``added_exclude`` keeps the models' id sets equal when a deadline stopped the
run-time extraction with some models further than others.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from kernel.errors import KernelError

VIEW_FORMAT = 1
VIEW_SUFFIX = ".view.json"


def view_path(store, model: str, split: str) -> Path:
    return Path(store) / model / f"{split}{VIEW_SUFFIX}"


def added_split(split: str) -> str:
    """The working store's split that holds the images of ``split`` extracted at run time."""
    return f"{split}_added"


@dataclass(frozen=True)
class View:
    path: Path  # the .view.json
    base: Path  # the shipped descriptor file, read in place
    exclude: frozenset = field(default_factory=frozenset)  # base ids left out
    added: Path | None = None  # the working store's <split>_added.npz, when the view takes it
    added_exclude: frozenset = field(default_factory=frozenset)  # added ids left out

    def sources(self) -> list[tuple[Path, frozenset]]:
        """``(descriptor file, ids left out)`` in row order."""
        return [(self.base, self.exclude)] + ([(self.added, self.added_exclude)] if self.added else [])


def write_view(store, model: str, split: str, base: Path, exclude=(), added: str | None = None,
               added_exclude=()) -> Path:
    """Atomically write ``STORE/<model>/<split>.view.json`` (``base`` absolute; ids sorted)."""
    from kernel.files import atomic_write

    path = view_path(store, model, split)
    doc = {"format": VIEW_FORMAT, "base": str(Path(base).resolve()), "exclude": sorted(map(str, exclude)),
           "added": added, "added_exclude": sorted(map(str, added_exclude))}
    atomic_write(path, lambda fh: fh.write(json.dumps(doc).encode()))
    return path


def read_view(store, model: str, split: str) -> View | None:
    """The view of ``split``, or None when the split has none. :class:`KernelError` naming the file when it is
    not a view this code wrote, or when a file it names is gone."""
    path = view_path(store, model, split)
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        ok = isinstance(doc, dict) and doc.get("format") == VIEW_FORMAT and isinstance(doc.get("base"), str)
        ok = ok and all(isinstance(doc.get(k, []), list) for k in ("exclude", "added_exclude"))
        ok = ok and (doc.get("added") is None or isinstance(doc["added"], str))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise KernelError(f"{path}: unreadable split view ({type(exc).__name__}: {exc})") from None
    if not ok:
        raise KernelError(f"{path}: not a split view of format {VIEW_FORMAT}")
    base = Path(doc["base"])
    added = Path(store) / model / f"{doc['added']}.npz" if doc.get("added") else None
    for p in (base, added):
        if p is not None and not p.is_file():
            raise KernelError(f"{path}: the descriptor file it reads, {p}, is missing")
    return View(path, base, frozenset(doc.get("exclude", [])), added, frozenset(doc.get("added_exclude", [])))
