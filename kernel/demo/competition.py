"""A small sample competition built from the thirteen real Google-Landmarks photos bundled in the package.

Photos of the same place share a landmark id (:data:`LANDMARK_GROUPS`, grouped by eye: the photos carry no
GLDv2 labels); any other photo is a landmark of its own. Each photo's *views* (random crop, flip, small rotation, colour and JPEG changes) are
spread over the splits: train views (labelled, ``train.csv``), index views (retrieval) and held-out test
views. Procedurally generated non-landmark images (gradients, shapes, noise) act as distractors in test and
index, and fill a non-landmark bank. One test file is deliberately broken (truncated JPEG) so a dry-run
shows how unreadable images are handled. Both Kaggle layouts are written (docs/kaggle.md#competition-folders)::

    OUT/landmark-recognition/  train/a/b/c/<id>.jpg  test/...  train.csv  sample_submission.csv  solution.csv
    OUT/landmark-retrieval/    index/...  test/...  sample_submission.csv  solution.csv
    OUT/nonlandmark/           <id>.jpg  (the non-landmark bank)

Ids are 16 hex digits, as Kaggle's. Everything follows from ``seed``.
"""
from __future__ import annotations

import csv
import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from kernel.demo import SAMPLE_DIR


# photos (file stems) showing the same place, grouped by looking at them; the rest are a landmark each
LANDMARK_GROUPS = {
    "chinesischer_turm_munich": ["003adbc21d2b9e75", "0316a05ee7d820fd", "21fbedf21e08ba67", "23442a8bc0a5cf02",
                                 "3508d01870adec28"],
    "eiffel_tower": ["00dec359ff83bb9a", "01a46dbceaf02f12", "01dbdce476ecaa76"],
    "alpine_hut_meadow": ["01d60cc1d2a34185", "0396419c3c2a6f62"],
}


def landmark_of(photos) -> dict:
    """Photo path -> landmark id (1000, 1001, ...): one per group of :data:`LANDMARK_GROUPS`, one per other photo."""
    group_of = {stem: g for g, stems in LANDMARK_GROUPS.items() for stem in stems}
    keys = sorted({group_of.get(p.stem, p.stem) for p in photos})
    ids = {k: 1000 + n for n, k in enumerate(keys)}
    return {p: ids[group_of.get(p.stem, p.stem)] for p in photos}


def sample_photos() -> list[Path]:
    photos = sorted(SAMPLE_DIR.glob("*.jpg"))
    if not photos:
        raise FileNotFoundError(f"{SAMPLE_DIR}: bundled sample photos are missing")
    return photos


def _id(*parts) -> str:
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:16]


def _view(photo: Image.Image, rng: random.Random, max_side: int) -> Image.Image:
    """A plausible second photo of the same landmark."""
    im = photo
    w, h = im.size
    f = rng.uniform(0.65, 0.95)
    cw, ch = int(w * f), int(h * f)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    im = im.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        im = ImageOps.mirror(im)
    im = im.rotate(rng.uniform(-8, 8), resample=Image.BILINEAR, expand=False)
    im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.75, 1.25))
    im = ImageEnhance.Color(im).enhance(rng.uniform(0.7, 1.3))
    im.thumbnail((max_side, max_side))
    return im


def _distractor(rng: random.Random, size=(320, 240)) -> Image.Image:
    """A non-landmark image: a gradient with random shapes and noise."""
    w, h = size
    a, b = np.array([rng.randint(0, 255) for _ in range(3)]), np.array([rng.randint(0, 255) for _ in range(3)])
    t = np.linspace(0, 1, w)[None, :, None]
    arr = (a * (1 - t) + b * t).repeat(h, axis=0)
    arr = arr + np.random.default_rng(rng.randint(0, 2**31)).normal(0, 12, arr.shape)
    im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(rng.randint(3, 8)):
        x0, y0 = rng.randint(0, w - 20), rng.randint(0, h - 20)
        box = [x0, y0, x0 + rng.randint(10, w // 2), y0 + rng.randint(10, h // 2)]
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=colour)
    return im


def _save(im: Image.Image, path: Path, rng: random.Random) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.convert("RGB").save(path, "JPEG", quality=rng.randint(80, 95))


def _kaggle_path(root: Path, split: str, image_id: str) -> Path:
    return root / split / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"


def _write_csv(path: Path, header, rows) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


@dataclass
class SampleCompetition:
    root: Path
    recognition: Path
    retrieval: Path
    nonlandmark: Path
    landmarks: dict = field(default_factory=dict)  # landmark_id -> source photo names
    labels: dict = field(default_factory=dict)  # image id -> landmark_id (train, index, test; None = distractor)
    broken: list = field(default_factory=list)  # test ids whose file is unreadable


def make_competition(
    out,
    seed: int = 0,
    train_views: int = 3,
    test_views: int = 2,
    index_views: int = 2,
    test_distractors: int = 6,
    index_distractors: int = 8,
    bank_size: int = 12,
    max_side: int = 320,
    photos=None,
) -> SampleCompetition:
    """Write the sample competition under ``out`` (see module docstring); returns its description."""
    rng = random.Random(seed)
    out = Path(out)
    comp = SampleCompetition(out, out / "landmark-recognition", out / "landmark-retrieval", out / "nonlandmark")
    photos = list(photos) if photos is not None else sample_photos()
    train_rows, rec_solution, ret_queries = [], [], []
    test_imgs, index_ids_by_lm = [], {}
    landmarks = landmark_of(photos)
    for n, photo_path in enumerate(photos):
        lm = landmarks[photo_path]
        comp.landmarks.setdefault(lm, []).append(photo_path.name)
        photo = ImageOps.exif_transpose(Image.open(photo_path)).convert("RGB")
        for v in range(train_views):
            i = _id(seed, "train", n, v)
            _save(_view(photo, rng, max_side), _kaggle_path(comp.recognition, "train", i), rng)
            train_rows.append((i, lm))
            comp.labels[i] = lm
        for v in range(index_views):
            i = _id(seed, "index", n, v)
            _save(_view(photo, rng, max_side), _kaggle_path(comp.retrieval, "index", i), rng)
            index_ids_by_lm.setdefault(lm, []).append(i)
            comp.labels[i] = lm
        for v in range(test_views):
            i = _id(seed, "test", n, v)
            test_imgs.append((i, _view(photo, rng, max_side)))
            comp.labels[i] = lm
    for d in range(test_distractors):
        i = _id(seed, "test-nl", d)
        test_imgs.append((i, _distractor(rng)))
        comp.labels[i] = None
    for d in range(index_distractors):
        i = _id(seed, "index-nl", d)
        _save(_distractor(rng), _kaggle_path(comp.retrieval, "index", i), rng)
        comp.labels[i] = None
    for d in range(bank_size):
        _save(_distractor(rng), comp.nonlandmark / f"{_id(seed, 'bank', d)}.jpg", rng)
    # test images go to both competitions; one of them is broken (a truncated JPEG)
    broken = test_imgs[0][0]
    comp.broken.append(broken)
    for i, im in test_imgs:
        for root in (comp.recognition, comp.retrieval):
            path = _kaggle_path(root, "test", i)
            _save(im, path, rng)
            if i == broken:
                buf = path.read_bytes()
                path.write_bytes(buf[: len(buf) // 3])
    usage = lambda k: "Public" if k % 2 == 0 else "Private"  # noqa: E731
    test_ids = sorted(i for i, _ in test_imgs)
    for k, i in enumerate(test_ids):
        lm = comp.labels[i]
        rec_solution.append((i, "" if lm is None else str(lm), usage(k)))
        # Kaggle's retrieval solutions list every test id; queries without a landmark are "Ignored"
        ret_queries.append((i, "", "Ignored") if lm is None else (i, " ".join(index_ids_by_lm[lm]), usage(k)))
    _write_csv(comp.recognition / "train.csv", ["id", "landmark_id"], sorted(train_rows))
    _write_csv(comp.recognition / "sample_submission.csv", ["id", "landmarks"], [(i, "") for i in test_ids])
    _write_csv(comp.recognition / "solution.csv", ["id", "landmarks", "Usage"], rec_solution)
    _write_csv(comp.retrieval / "sample_submission.csv", ["id", "images"], [(i, "") for i in test_ids])
    _write_csv(comp.retrieval / "solution.csv", ["id", "images", "Usage"], ret_queries)
    return comp
