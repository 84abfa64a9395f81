"""Training data: GLDv2 label CSVs, image folders, the class map, the dataset and a long-tail-aware sampler.

CSV formats (detected from the header):
- ``id,landmark_id[,...]``: GLDv2 ``train.csv`` (one row per image; extra columns such as ``url`` ignored);
- ``landmark_id,images``: GLDv2 ``train_clean.csv`` (one row per class, space-separated image ids).
Both are read and checked by :mod:`kernel.labels`, as post-processing reads ``train.csv``.

Image folders: ``ROOT/a/b/c/<id>.jpg`` (the first three characters of the id, as GLDv2 and Kaggle ship them)
or flat ``ROOT/<id>.jpg``; the layout is detected once from the first image.

Named data sets of the recipes (docs/kaggle.md#data-sets-and-their-sizes), resolved inside ``--data DIR``:
- ``gldv2``: ``train.csv`` (full GLDv2: 4,132,914 images, 203,094 classes);
- ``gldv2c``: ``train_clean.csv`` (cleaned GLDv2: 1,580,470 images, 81,313 classes);
- ``gldv2x``: every ``train.csv`` image of the classes that ``train_clean.csv`` holds;
- ``gldv2_clustered``: ``train_clustered.csv``, written by ``python -m kernel.train clean``.
"""
from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from kernel.data.decode import DecodeError
from kernel.errors import KernelError
from kernel.labels import check_train_labels, read_label_csv

log = logging.getLogger(__name__)

DATASETS = {
    "gldv2": "train.csv",
    "gldv2c": "train_clean.csv",
    "gldv2x": ("train.csv", "train_clean.csv"),
    "gldv2_clustered": "train_clustered.csv",
}


def read_labels(path: str | Path, what: str = "train labels", non_landmark: bool = False) -> pd.DataFrame:
    """Read a label CSV in either format; returns a frame ``id`` (str), ``landmark_id`` (int64).

    Read and checked by :mod:`kernel.labels` (the post-processing's reader: Kaggle-written landmark ids, ids a
    CSV can hold, no id twice; errors name the file and line). ``what`` names the file in those errors.
    ``non_landmark``: also accept ``-1``, an image that shows no landmark (validation labels only)."""
    df = read_label_csv(path, what)
    cols = set(df.columns)
    lines = None
    if {"landmark_id", "images"} <= cols and "id" not in cols:  # one row per class: line of each image's row
        df = df.assign(line=np.arange(len(df)) + 2, id=df["images"].str.split()).explode("id").dropna(subset=["id"])
        lines = df["line"].to_numpy()
    elif not {"id", "landmark_id"} <= cols:
        raise KernelError(
            f"{path}: needs columns 'id,landmark_id' (train.csv) or 'landmark_id,images' (train_clean.csv), "
            f"has {', '.join(df.columns)}"
        )
    labels = check_train_labels(df, str(path), lines, non_landmark=non_landmark and lines is None)
    return pd.DataFrame({"id": labels.index, "landmark_id": labels.to_numpy().astype(np.int64)})


def load_named(data_dir: str | Path, name: str) -> pd.DataFrame:
    """The labels of a named data set (see module docstring) inside ``data_dir``."""
    if name not in DATASETS:
        raise KernelError(f"unknown data set '{name}' (known: {', '.join(DATASETS)})")
    spec = DATASETS[name]
    data_dir = Path(data_dir)
    if isinstance(spec, tuple):
        full, clean = (read_labels(data_dir / f) for f in spec)
        df = full[full["landmark_id"].isin(set(clean["landmark_id"]))].reset_index(drop=True)
        log.info("%s: %d images of the %d classes of %s", name, len(df), clean["landmark_id"].nunique(), spec[1])
        return df
    return read_labels(data_dir / spec)


class ClassMap:
    """Landmark id <-> class index (sorted landmark ids). Saved with every checkpoint: a head row means
    nothing without it."""

    def __init__(self, landmark_ids):
        ids = sorted({int(i) for i in landmark_ids})
        if not ids:
            raise KernelError("no classes: the label CSV is empty")
        self.landmark_ids = ids
        self.index = {lid: i for i, lid in enumerate(ids)}

    def __len__(self) -> int:
        return len(self.landmark_ids)

    def __eq__(self, other) -> bool:
        return isinstance(other, ClassMap) and self.landmark_ids == other.landmark_ids

    def encode(self, landmark_ids) -> np.ndarray:
        try:
            return np.asarray([self.index[int(i)] for i in landmark_ids], dtype=np.int64)
        except KeyError as exc:
            raise KernelError(f"landmark_id {exc.args[0]} is not in the class map") from None

    def decode(self, classes) -> np.ndarray:
        ids = np.asarray(self.landmark_ids, dtype=np.int64)
        return ids[np.asarray(classes, dtype=np.int64)]

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["class_id", "landmark_id"])
            w.writerows(enumerate(self.landmark_ids))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "ClassMap":
        df = pd.read_csv(path)
        if list(df.columns) != ["class_id", "landmark_id"] or not (df["class_id"] == np.arange(len(df))).all():
            raise KernelError(f"{path}: expected columns class_id,landmark_id with class_id = 0..N-1")
        return cls(df["landmark_id"].tolist())


def find_layout(root: str | Path, image_id: str, suffix: str = ".jpg") -> str:
    """``"nested"`` (``a/b/c/<id>``) or ``"flat"`` (``<id>``), from where ``image_id`` lies."""
    root = Path(root)
    if (root / image_id[0] / image_id[1] / image_id[2] / f"{image_id}{suffix}").is_file():
        return "nested"
    if (root / f"{image_id}{suffix}").is_file():
        return "flat"
    raise KernelError(
        f"{root}: image '{image_id}' is neither at {image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}{suffix} "
        f"nor at {image_id}{suffix}"
    )


def image_path(root: Path, image_id: str, layout: str, suffix: str = ".jpg") -> Path:
    if layout == "nested":
        return root / image_id[0] / image_id[1] / image_id[2] / f"{image_id}{suffix}"
    return root / f"{image_id}{suffix}"


def decode_rgb(path: Path, min_side: int | None = None) -> torch.Tensor:
    """Decode an image file to a uint8 (3, H, W) RGB tensor with the kernel's inference decoder
    (:func:`kernel.data.decode.decode_image`: EXIF orientation, any mode, reduced-scale decoding of huge JPEGs
    that keeps both sides >= ``min_side``), so training sees the pixels inference sees."""
    from kernel.data.decode import decode_image

    rgb = decode_image(path, min_side=min_side)
    return torch.from_numpy(rgb if rgb.flags.writeable else rgb.copy()).permute(2, 0, 1)


class LandmarkDataset(Dataset):
    """``(image, class)`` pairs; ``transform`` maps a uint8 (3, H, W) tensor to the model input.

    A file that cannot be decoded is logged and replaced by the next sample, so one bad JPEG among millions
    never stops a multi-day run; :attr:`failures` counts them (per worker process).
    """

    def __init__(self, ids, classes, root: str | Path, transform=None, suffix: str = ".jpg",
                 min_side: int | None = None):
        self.ids = [str(i) for i in ids]
        self.classes = np.asarray(classes, dtype=np.int64)
        if len(self.ids) != len(self.classes):
            raise ValueError("ids and classes differ in length")
        if not self.ids:
            raise KernelError(f"{root}: no training images")
        self.root = Path(root)
        self.suffix = suffix
        self.layout = find_layout(self.root, self.ids[0], suffix)
        self.transform = transform
        self.min_side = min_side
        self.failures = 0

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> torch.Tensor:
        return decode_rgb(image_path(self.root, self.ids[index], self.layout, self.suffix), self.min_side)

    def __getitem__(self, index: int):
        for attempt in range(len(self.ids)):
            i = (index + attempt) % len(self.ids)
            try:
                img = self.load(i)
            except (DecodeError, OSError, ValueError, Image.DecompressionBombError) as exc:
                self.failures += 1
                log.warning("cannot decode %s (%s); using the next image", self.ids[i], exc)
                continue
            if self.transform is not None:
                img = self.transform(img)
            return img, int(self.classes[i])
        raise KernelError(f"{self.root}: no image could be decoded")


def holdout(df: pd.DataFrame, fraction: float, min_images: int = 2, seed: int = 0):
    """Split off ``floor(fraction * n)`` of the ``n`` images of every class with at least ``min_images``
    images, never its last one. Returns ``(train_df, val_df)``.

    Our reading (the 2021 original trained on the whole list and validated on the 2019 test set; the 2020 one
    held out a fifth of the clean images): a class with fewer than ``1 / fraction`` images keeps them all, so
    the hold-out neither halves the many two-image classes nor changes which classes train. Pass the whole
    list as ``margin_labels`` to :class:`kernel.train.fit.StepRun` so the dynamic margins stay the original's.
    """
    if not 0 <= fraction < 1:
        raise KernelError(f"validation fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return df, df.iloc[:0]
    rng = np.random.default_rng(seed)
    val_idx = []
    for _, idx in df.groupby("landmark_id").indices.items():
        if len(idx) < min_images:
            continue
        n = min(len(idx) - 1, int(math.floor(fraction * len(idx) + 1e-9)))
        if n > 0:
            val_idx.extend(rng.choice(idx, size=n, replace=False).tolist())
    mask = np.zeros(len(df), dtype=bool)
    mask[val_idx] = True
    return df[~mask].reset_index(drop=True), df[mask].reset_index(drop=True)


def read_val_labels(path: str | Path) -> pd.DataFrame:
    """Validation labels: a label CSV (:func:`read_labels`) or a Kaggle recognition solution file
    ``id,landmarks[,Usage]`` (the 2019 test set the 2021 configs validated on: ``recognition_solution_v2.1.csv``)
    where ``landmarks`` is empty for a non-landmark image (landmark_id -1 here) and holds space-separated ids
    otherwise (the first is used, as the original dataset code did); rows with ``Usage`` "Ignored" are dropped."""
    path = Path(path)
    try:
        head = pd.read_csv(path, nrows=0).columns if path.is_file() else []
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise KernelError(f"{path}: not a readable CSV ({exc})") from None
    if "landmarks" not in head or "landmark_id" in head:
        return read_labels(path, "validation labels", non_landmark=True)
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "Usage" in df.columns:
        df = df[df["Usage"] != "Ignored"]
    first = df["landmarks"].str.split().str[0]
    lid = pd.to_numeric(first.fillna("-1"), errors="coerce")
    if lid.isna().any():
        raise KernelError(f"{path}: field 'landmarks' must hold integer ids (got {df.loc[lid.isna(), 'landmarks'].iloc[0]!r})")
    return pd.DataFrame({"id": df["id"].str.strip(), "landmark_id": lid.astype(np.int64)}).reset_index(drop=True)


def class_weights(classes, power: float) -> np.ndarray:
    """Per-sample weights ``n_c ** -power`` (0: uniform over images, 0.5: square-root balancing, 1: uniform
    over classes)."""
    classes = np.asarray(classes, dtype=np.int64)
    counts = np.bincount(classes)
    return counts[classes].astype(np.float64) ** -power


class DistributedWeightedSampler(Sampler):
    """Weighted sampling with replacement, sharded over DDP ranks: every rank draws the same
    ``num_samples * world`` indices from one generator seeded by ``(seed, epoch)`` and keeps its slice."""

    def __init__(self, weights, num_samples: int | None = None, rank: int = 0, world: int = 1, seed: int = 0):
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        self.num_samples = num_samples or math.ceil(len(self.weights) / world)
        self.rank, self.world, self.seed, self.epoch = rank, world, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        idx = torch.multinomial(self.weights, self.num_samples * self.world, replacement=True, generator=g)
        return iter(idx[self.rank :: self.world].tolist())

    def __len__(self) -> int:
        return self.num_samples
