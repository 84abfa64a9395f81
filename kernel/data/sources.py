"""Image sources: where the images of a split come from, as a sorted list of ``Record(id, path)``.

Three kinds (docs/kaggle.md#competition-folders):

- a Kaggle competition folder: ``ROOT/<split>/a/b/c/<id>.jpg`` (a, b, c = the id's first three characters),
  with ``train.csv`` (train) or ``sample_submission.csv`` (test) listing the ids of the split;
- a plain folder of images (searched recursively, id = file name without extension);
- a CSV file with columns ``id,path`` (relative paths are relative to the CSV's folder).

Every source returns records sorted by id, so any run, on any machine, sees the same order (which is what
makes ``--shard i/n`` and resuming well defined). Ids must be unique within a source.
"""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import NamedTuple

from kernel.errors import KernelError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
KAGGLE_SPLITS = ("train", "index", "test")
# the CSV that lists a Kaggle split's ids (a listed id without a file becomes a record that fails to decode)
KAGGLE_ID_CSV = {"train": "train.csv", "test": "sample_submission.csv"}


class Record(NamedTuple):
    """One image: its id (the Kaggle id, or the file name without extension) and its path."""

    id: str
    path: str


def _walk_images(root: Path) -> list[Path]:
    """Image files under ``root`` (recursive, hidden files and folders skipped), in no particular order.
    Linked folders are followed once each: a link back to a folder already walked (a loop) is skipped."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            log.warning("%s: folder already walked (a symbolic link loop?): skipped",
                        dirpath.encode("utf-8", "backslashreplace").decode() if isinstance(dirpath, str) else dirpath)
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                if not _utf8(os.path.join(dirpath, name)):
                    continue
                found.append(Path(dirpath) / name)
    return found


def _utf8(path: str) -> bool:
    """True when ``path`` is valid UTF-8; an undecodable file name (its id could never be written into a
    CSV or a store) is skipped with a warning instead."""
    try:
        path.encode("utf-8")
        return True
    except UnicodeEncodeError:
        log.warning("%s: file name is not valid UTF-8: image skipped", path.encode("utf-8", "backslashreplace").decode())
        return False


def _unique_sorted(records: list[Record], where: str) -> list[Record]:
    records = sorted(records)
    for prev, cur in zip(records, records[1:]):
        if prev.id == cur.id:
            raise KernelError(f"{where}: id '{cur.id}' appears twice ({prev.path} and {cur.path})")
    return records


def _csv_ids(path: Path) -> list[str]:
    """The ``id`` column of a Kaggle CSV (train.csv / sample_submission.csv)."""
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or "id" not in reader.fieldnames:
                raise KernelError(f"{path}: column 'id' is missing (columns: {reader.fieldnames})")
            return [row["id"].strip() for row in reader if row["id"] and row["id"].strip()]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise KernelError(f"{path}: cannot read ({exc})") from None


def kaggle_path(root: str | Path, split: str, image_id: str) -> Path:
    """Where the competition keeps an image: ``ROOT/<split>/a/b/c/<id>.jpg``."""
    return Path(root) / split / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"


def kaggle_split(root: str | Path, split: str) -> list[Record]:
    """Records of one split of a Kaggle competition folder.

    Walks ``ROOT/<split>/`` for image files (id = file name without extension). When the split's id CSV
    (``train.csv`` for train, ``sample_submission.csv`` for test) is present, ids it lists but that have no
    file are added with their expected path: they fail to decode ("missing file"), are reported, and still
    get their row downstream. The hidden test set replaces the visible one at scoring time, so nothing here
    assumes a size.
    """
    root = Path(root)
    folder = root / split
    if not folder.is_dir():
        raise KernelError(f"{folder}: split folder '{split}' not found in the competition folder {root}")
    records = [Record(p.stem, str(p)) for p in _walk_images(folder)]
    id_csv = KAGGLE_ID_CSV.get(split)
    if id_csv and (root / id_csv).is_file():
        have = {r.id for r in records}
        missing = [i for i in dict.fromkeys(_csv_ids(root / id_csv)) if i not in have]
        if missing:
            log.warning("%s: %d ids listed in %s have no image file (first: %s)",
                        folder, len(missing), id_csv, missing[0])
            records += [Record(i, str(kaggle_path(root, split, i))) for i in missing if len(i) >= 3]
    return _unique_sorted(records, str(folder))


def folder_source(directory: str | Path) -> list[Record]:
    """Records of every image file under ``directory`` (recursive); id = file name without extension."""
    directory = Path(directory)
    if not directory.is_dir():
        raise KernelError(f"{directory}: image folder not found")
    return _unique_sorted([Record(p.stem, str(p)) for p in _walk_images(directory)], str(directory))


def csv_source(path: str | Path) -> list[Record]:
    """Records listed in a CSV with columns ``id,path`` (relative paths are relative to the CSV's folder)."""
    path = Path(path)
    if not path.is_file():
        raise KernelError(f"{path}: image list not found")
    records = []
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            for field in ("id", "path"):
                if reader.fieldnames is None or field not in reader.fieldnames:
                    raise KernelError(f"{path}: column '{field}' is missing (columns: {reader.fieldnames})")
            for line, row in enumerate(reader, start=2):
                image_id, image_path = (row["id"] or "").strip(), (row["path"] or "").strip()
                if not image_id or not image_path:
                    raise KernelError(f"{path}: line {line}: empty {'id' if not image_id else 'path'}")
                p = Path(image_path)
                records.append(Record(image_id, str(p if p.is_absolute() else path.parent / p)))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise KernelError(f"{path}: cannot read ({exc})") from None
    return _unique_sorted(records, str(path))


def is_kaggle_root(directory: str | Path) -> bool:
    """A competition folder: holds a split folder next to a Kaggle CSV (train.csv / sample_submission.csv)."""
    d = Path(directory)
    return any((d / s).is_dir() for s in KAGGLE_SPLITS) and any((d / c).is_file() for c in KAGGLE_ID_CSV.values())


def open_source(spec: str | Path, split: str) -> list[Record]:
    """Records for ``spec``: a ``.csv`` file, a Kaggle competition folder (the ``split`` folder of it) or a
    plain folder of images (``split`` then only names the split in the store)."""
    p = Path(spec)
    if p.is_file():
        if p.suffix.lower() != ".csv":
            raise KernelError(f"{p}: expected a folder of images or a .csv with columns id,path")
        return csv_source(p)
    if not p.exists():
        raise KernelError(f"{p}: image source not found")
    if (p / split).is_dir() or is_kaggle_root(p):
        return kaggle_split(p, split)
    return folder_source(p)


def shard(records: list[Record], index: int, count: int) -> list[Record]:
    """The ``index``-th of ``count`` interleaved shards of the records (``--shard i/n``; 0 <= i < n)."""
    if count < 1 or not 0 <= index < count:
        raise KernelError(f"shard {index}/{count}: need 0 <= i < n")
    return records[index::count]


def parse_shard(text: str) -> tuple[int, int]:
    """Parse ``"i/n"`` (``--shard``)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise KernelError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise KernelError(f"--shard {text!r}: need 0 <= i < n")
    return i, n
