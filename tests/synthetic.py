"""A synthetic landmark-descriptor world, to test and benchmark the post-processing without images.

The world is built in a small latent space and then seen through several "models":

* landmarks cluster in groups (churches look like churches): centre = normalise(group + ``spread`` * own);
* each landmark has several views (sides, interiors), each a direction around its centre; an image is a
  noisy sample of one view, so two views of one landmark can be less alike than two different landmarks
  of a group (what plain cosine gets wrong and label-aware re-ranking fixes);
* non-landmark images (portraits, food, rooms) come from a few clutter clusters;
* the labelled train set is long-tailed (a landmark's count falls with its rank as a power law) and
  polluted: a fraction of its images are non-landmark images carrying a landmark's label;
* a non-landmark bank, a retrieval index (landmark views + distractors) and two query sets: retrieval
  queries (views of index landmarks, and non-landmark queries that Kaggle ignores) and recognition
  queries (landmark views and many non-landmark images, as in GLDv2's test set);
* every model m sees an image through its own random near-isometry of the latent space plus its own noise,
  so an ensemble averages model noise away; models belong to the families of docs/architectures.md#the-ensemble.

:func:`write_store` writes one track's descriptor store, ``train.csv`` and Kaggle solution file.
``python -m tests.synthetic --out DIR --track retrieval`` does the same from the command line.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kernel import store
from kernel.models.manifest import ENSEMBLE
from kernel.files import atomic_write

logger = logging.getLogger(__name__)

MODELS = ENSEMBLE  # (name, family, tracks) of the 2021 ensemble


@dataclass
class SyntheticConfig:
    """Sizes and noise levels of the synthetic world (defaults: a few thousand images, seconds on a CPU)."""

    seed: int = 0
    latent_dim: int = 64
    dim: int = 512  # descriptor width of every model
    n_groups: int = 12
    n_landmarks: int = 300
    spread: float = 0.55  # landmark centre = group + spread * own direction (small: groups are confusable)
    views: int = 3  # views per landmark
    view_spread: float = 0.9  # view = centre + view_spread * own direction
    image_noise: float = 0.35  # image = view + image_noise * noise
    n_clutter: int = 6  # non-landmark clusters
    clutter_noise: float = 0.6
    train_max: int = 40  # train images of the most frequent landmark
    train_min: int = 2
    tail_power: float = 0.7  # count(rank) = train_max * rank^-power
    pollution: float = 0.15  # fraction of train images that are mislabelled non-landmarks
    n_bank: int = 800  # non-landmark bank
    index_landmarks: int = 150  # landmarks present in the retrieval index
    index_per_landmark: int = 6
    index_distractors: int = 1500  # index images that no query relates to (other landmarks + clutter)
    retrieval_queries: int = 300
    retrieval_nonlandmark_queries: int = 60
    recognition_queries: int = 300
    recognition_nonlandmark_queries: int = 300
    model_noise: float = 0.8  # per-model descriptor noise (relative to the signal): ensembles average it
    models: tuple = field(default_factory=lambda: MODELS)


@dataclass
class Split:
    name: str  # which part of the world (seeds the models' noise)
    ids: list[str]
    latent: np.ndarray  # (N, latent_dim), rows L2-normalised
    landmark: list[str | None]  # landmark of each image (None = non-landmark)


@dataclass
class SyntheticWorld:
    config: SyntheticConfig
    train: Split  # landmark = its (possibly polluted) train label
    bank: Split
    index: Split
    retrieval_test: Split
    recognition_test: Split
    retrieval_solution: dict[str, tuple[list[str], str]]  # id -> (relevant index ids, Usage)
    recognition_solution: dict[str, tuple[list[str], str]]  # id -> (landmarks, Usage)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def generate(config: SyntheticConfig | None = None) -> SyntheticWorld:
    """Draw a synthetic world (deterministic for a given ``config.seed``)."""
    c = config or SyntheticConfig()
    rng = np.random.default_rng(c.seed)
    L = c.latent_dim
    groups = _unit(rng.standard_normal((c.n_groups, L)))
    group_of = rng.integers(0, c.n_groups, c.n_landmarks)
    centres = _unit(groups[group_of] + c.spread * _unit(rng.standard_normal((c.n_landmarks, L))))
    views = _unit(centres[:, None, :] + c.view_spread * _unit(rng.standard_normal((c.n_landmarks, c.views, L))))
    clutter = _unit(rng.standard_normal((c.n_clutter, L)))
    landmark_ids = [str(1000 + 7 * i) for i in range(c.n_landmarks)]
    counter = iter(range(10**9))

    def new_id() -> str:
        return f"{next(counter):016x}"

    def landmark_images(lms: np.ndarray) -> np.ndarray:
        v = views[lms, rng.integers(0, c.views, len(lms))]
        return _unit(v + c.image_noise * rng.standard_normal((len(lms), L)) / np.sqrt(L))

    def clutter_images(n: int) -> np.ndarray:
        cl = clutter[rng.integers(0, c.n_clutter, n)]
        return _unit(cl + c.clutter_noise * rng.standard_normal((n, L)) / np.sqrt(L))

    def split(name: str, lms: np.ndarray | None, n_clutter: int) -> Split:
        parts, marks = [], []
        if lms is not None and len(lms):
            parts.append(landmark_images(lms))
            marks += [landmark_ids[i] for i in lms]
        if n_clutter:
            parts.append(clutter_images(n_clutter))
            marks += [None] * n_clutter
        lat = np.concatenate(parts) if parts else np.zeros((0, L))
        perm = rng.permutation(len(lat))
        return Split(name, [new_id() for _ in perm], lat[perm].astype(np.float32), [marks[i] for i in perm])

    # train: long-tailed, polluted with mislabelled non-landmark images
    rank = rng.permutation(c.n_landmarks) + 1
    counts = np.maximum(c.train_min, (c.train_max * rank.astype(float) ** -c.tail_power).astype(int))
    train_lms = np.repeat(np.arange(c.n_landmarks), counts)
    n_polluted = int(round(c.pollution * len(train_lms) / (1 - c.pollution)))
    train = split("train", train_lms, n_polluted)
    polluted_labels = iter(rng.choice(landmark_ids, n_polluted))
    train.landmark = [m if m is not None else next(polluted_labels) for m in train.landmark]

    bank = split("nonlandmark", None, c.n_bank)
    # index: index landmarks with several images + distractors (landmarks outside the index set, clutter)
    idx_lms = rng.choice(c.n_landmarks, c.index_landmarks, replace=False)
    others = np.setdiff1d(np.arange(c.n_landmarks), idx_lms)
    n_other = c.index_distractors // 2
    index = split(
        "index",
        np.concatenate([np.repeat(idx_lms, c.index_per_landmark), rng.choice(others, n_other)]),
        c.index_distractors - n_other,
    )
    # retrieval queries: views of index landmarks (+ non-landmark queries, "Ignored" as on Kaggle)
    retrieval_test = split("retrieval_test", rng.choice(idx_lms, c.retrieval_queries), c.retrieval_nonlandmark_queries)
    by_landmark: dict[str, list[str]] = {}
    for i, m in zip(index.ids, index.landmark):
        if m is not None:
            by_landmark.setdefault(m, []).append(i)
    retrieval_solution = {}
    for n, (q, m) in enumerate(zip(retrieval_test.ids, retrieval_test.landmark)):
        usage = "Public" if n % 3 == 0 else "Private"
        retrieval_solution[q] = (by_landmark[m], usage) if m is not None else ([], "Ignored")
    # recognition queries: landmark images (any landmark) and many non-landmark images
    recognition_test = split(
        "recognition_test", rng.integers(0, c.n_landmarks, c.recognition_queries), c.recognition_nonlandmark_queries
    )
    recognition_solution = {
        q: ([m] if m is not None else [], "Public" if n % 3 == 0 else "Private")
        for n, (q, m) in enumerate(zip(recognition_test.ids, recognition_test.landmark))
    }
    return SyntheticWorld(c, train, bank, index, retrieval_test, recognition_test, retrieval_solution, recognition_solution)


def model_descriptors(world: SyntheticWorld, split: Split, model_index: int) -> np.ndarray:
    """How model ``model_index`` sees a split: its own random projection of the latent space plus its own noise."""
    c = world.config
    rng = np.random.default_rng([c.seed, 1, model_index])
    w = rng.standard_normal((c.dim, c.latent_dim)) / np.sqrt(c.dim)  # near-isometry (dim >> latent_dim)
    part = [ord(ch) for ch in split.name]
    noise_rng = np.random.default_rng([c.seed, 2, model_index, *part])
    noise = noise_rng.standard_normal((len(split.ids), c.dim)) * (c.model_noise / np.sqrt(c.dim))
    return _unit(split.latent @ w.T + noise).astype(np.float32)


def _write_csv(path: Path, header: list[str], rows) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    data = buf.getvalue().encode()
    atomic_write(path, lambda fh: fh.write(data))


def write_store(world: SyntheticWorld, out: str | Path, track: str, models=None, bank: bool = True) -> dict[str, Path]:
    """Write ``out/store`` (descriptors of ``track``'s models), ``out/train.csv`` and ``out/solution.csv``.

    Splits: ``test`` (the track's queries), ``train``, plus ``index`` (retrieval) or ``nonlandmark``
    (recognition, when ``bank``). Returns the paths written.
    """
    if track not in ("recognition", "retrieval"):
        raise ValueError(f"unknown track {track!r}")
    out = Path(out)
    root = out / "store"
    chosen = [(j, m) for j, m in enumerate(world.config.models) if track in m[2]]
    if models is not None:
        chosen = [(j, m) for j, m in chosen if m[0] in set(models)]
    test = world.retrieval_test if track == "retrieval" else world.recognition_test
    splits = {"test": test, "train": world.train}
    if track == "retrieval":
        splits["index"] = world.index
    elif bank:
        splits["nonlandmark"] = world.bank
    for j, (name, family, tracks) in chosen:
        for split_name, split in splits.items():
            store.save_split(root, name, split_name, split.ids, model_descriptors(world, split, j))
        store.write_meta(root, name, {
            "name": name, "family": family, "tracks": list(tracks), "dim": world.config.dim,
            "image_size": None, "sha256": None, "synthetic": True,
        })
    _write_csv(out / "train.csv", ["id", "landmark_id"], zip(world.train.ids, world.train.landmark))
    sol = world.retrieval_solution if track == "retrieval" else world.recognition_solution
    column = "images" if track == "retrieval" else "landmarks"
    _write_csv(out / "solution.csv", ["id", column, "Usage"], ((k, " ".join(v), u) for k, (v, u) in sol.items()))
    logger.info("synthetic %s world: %d models in %s", track, len(chosen), root)
    return {"store": root, "train_labels": out / "train.csv", "solution": out / "solution.csv"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.synthetic", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for store/, train.csv and solution.csv")
    p.add_argument("--track", required=True, choices=["recognition", "retrieval"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-bank", action="store_true", help="recognition: no nonlandmark split")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    paths = write_store(generate(SyntheticConfig(seed=args.seed)), args.out, args.track, bank=not args.no_bank)
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
