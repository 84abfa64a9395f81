"""The scored rerun's folders, made from the public ones: what a notebook meets when Kaggle scores it.

Kaggle scores a code-competition notebook by running it again on hidden data (docs/kaggle.md#the-scored-rerun):
a larger test set, and reference folders that differ from the public ones (the 2021 recognition rerun's
``train.csv`` held new landmarks and lacked some public ids; retrieval's hidden index is larger). A rehearsal on the
public folder alone cannot show how a notebook meets that. :func:`make_rerun` writes such a variant of a public
competition folder, without any label of the hidden data:

* recognition: ``new_landmarks`` landmarks of ``train.csv`` become new ones (their train images get new ids and a
  new landmark id: present, never shipped), ``gone`` other train images are removed, and the test set is
  ``test_factor`` times the public one (its images again under new ids) plus, for each new landmark, copies of
  its train images as test images whose answer is known (the new landmark);
* retrieval: ``added`` index images appear under new ids (present, never shipped), ``gone`` index images are
  removed, and the test set grows as above, plus queries that copy each added index image (their best answer is
  known: that image).

Unchanged images are symbolic links to the public files (hard links or copies where links fail), so a variant of a
full-size folder costs little disk. ``rerun.json`` beside the folder says what was changed and the known answers.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

from kernel.errors import KernelError

IMAGE_SUFFIX = ".jpg"


def _new_id(seed: int, *parts) -> str:
    return hashlib.sha256("/".join(map(str, ("rerun", seed, *parts))).encode()).hexdigest()[:16]


def _place(src: Path, root: Path, split: str, image_id: str, link: bool = True) -> None:
    """``root/<split>/a/b/c/<id>.jpg`` (Kaggle's layout) as a link to ``src`` (a copy where links fail)."""
    from kernel.data.sources import kaggle_path

    dst = Path(kaggle_path(root, split, image_id))
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.symlink(Path(src).resolve(), dst)
            return
        except OSError:
            pass
    shutil.copyfile(src, dst)


def _write_csv(path: Path, header: list[str], rows) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _grow_test(public: Path, out: Path, factor: int, seed: int) -> list[str]:
    """The public test images, plus ``factor - 1`` more copies of each under new ids; returns every test id."""
    from kernel.data.sources import kaggle_split

    ids = []
    for r in kaggle_split(public, "test"):
        if not Path(r.path).is_file():
            continue
        _place(Path(r.path), out, "test", r.id)
        ids.append(r.id)
        for k in range(1, factor):
            copy = _new_id(seed, "test", r.id, k)
            _place(Path(r.path), out, "test", copy, link=False)  # a file of its own: a new image to the kernel
            ids.append(copy)
    return ids


def make_rerun(public, out, track: str, test_factor: int = 3, new_landmarks: int = 1, added: int = 3,
               gone: int = 2, seed: int = 0) -> dict:
    """Write the rerun variant of the public competition folder ``public`` into the new folder ``out``; returns
    (and writes as ``out/rerun.json``) what changed and the answers known by construction."""
    public, out = Path(public), Path(out)
    if out.exists() and any(out.iterdir()):
        raise KernelError(f"{out}: exists and is not empty: the rerun variant needs a new folder")
    if test_factor < 1:
        raise KernelError(f"test_factor must be at least 1 (got {test_factor})")
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    test_ids = _grow_test(public, out, test_factor, seed)
    info = (_recognition(public, out, rng, new_landmarks, gone, seed) if track == "recognition"
            else _retrieval(public, out, rng, added, gone, seed))
    test_ids += sorted(info["known_answers"])
    header = ["id", "landmarks"] if track == "recognition" else ["id", "images"]
    _write_csv(out / "sample_submission.csv", header, [(i, "") for i in sorted(test_ids)])
    info.update(track=track, public=str(public), test_images=len(test_ids), test_factor=test_factor, seed=seed)
    (out / "rerun.json").write_text(json.dumps(info, indent=2))
    return info


def _recognition(public: Path, out: Path, rng: random.Random, n_new: int, n_gone: int, seed: int) -> dict:
    from kernel.data.sources import kaggle_split
    from kernel.labels import read_train_labels

    labels = read_train_labels(public / "train.csv")
    records = {r.id: r for r in kaggle_split(public, "train") if Path(r.path).is_file()}
    counts = labels[labels.index.isin(list(records))].value_counts()
    candidates = sorted(counts[counts >= 2].index, key=int)
    if len(candidates) < n_new:
        raise KernelError(f"{public / 'train.csv'}: fewer than {n_new} landmarks with two train images")
    chosen = rng.sample(candidates, n_new)
    top = max(int(x) for x in labels.unique())
    renamed, known, rows, new_landmarks = {}, {}, [], {}
    for k, lm in enumerate(chosen):
        new_lm = str(top + 1 + k)
        new_landmarks[new_lm] = str(lm)
        for old in sorted(labels.index[labels == lm]):
            if old in records:
                renamed[old] = (_new_id(seed, "train", old), new_lm)
        first = sorted(o for o in renamed if renamed[o][1] == new_lm)[0]
        known[_new_id(seed, "test-of", first)] = (first, new_lm)
    others = sorted(i for i in records if i not in renamed)
    gone = set(rng.sample(others, min(n_gone, len(others))))
    for image_id, lm in labels.items():
        if image_id in gone or image_id not in records:
            continue
        new_id, lm = renamed.get(image_id, (image_id, lm))
        _place(Path(records[image_id].path), out, "train", new_id, link=image_id not in renamed)
        rows.append((new_id, lm))
    for test_id, (src, _) in known.items():
        _place(Path(records[src].path), out, "test", test_id, link=False)
    _write_csv(out / "train.csv", ["id", "landmark_id"], sorted(rows))
    return {"new_landmarks": new_landmarks,  # new landmark id -> the public one whose images it took
            "added_train": sorted(v[0] for v in renamed.values()), "gone_train": sorted(gone | set(renamed)),
            "known_answers": {t: lm for t, (_, lm) in known.items()}}


def _retrieval(public: Path, out: Path, rng: random.Random, n_added: int, n_gone: int, seed: int) -> dict:
    from kernel.data.sources import kaggle_split

    records = [r for r in kaggle_split(public, "index") if Path(r.path).is_file()]
    if len(records) < n_added + n_gone:
        raise KernelError(f"{public / 'index'}: too few index images for {n_added} added and {n_gone} gone")
    picked = rng.sample(records, n_added + n_gone)
    sources, gone = picked[:n_added], {r.id for r in picked[n_added:]}
    for r in records:
        if r.id not in gone:
            _place(Path(r.path), out, "index", r.id)
    known = {}
    for r in sources:
        new_id = _new_id(seed, "index", r.id)
        _place(Path(r.path), out, "index", new_id, link=False)
        query = _new_id(seed, "query-of", r.id)
        _place(Path(r.path), out, "test", query, link=False)
        known[query] = new_id
    return {"added_index": sorted(known.values()), "gone_index": sorted(gone), "known_answers": known}
