"""Which reference images a run uses, decided per image at run time (the scored rerun's folders are not the public
ones: docs/kaggle.md#the-scored-rerun, :mod:`kernel.views`).

For every reference split a shipped store holds, ``predict`` compares the images the competition folder has
*now* with the shipped ids and sorts them three ways: shipped and present (used as shipped), present but not
shipped (extracted here into ``<split>_added``, after the test set), shipped but no longer present (left out).
The train split counts an image as present only when the competition's labels give it a landmark id: the
post-processing cannot use an unlabelled train image.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


@dataclass
class Coverage:
    """One model's reference split against what the competition has now."""

    split: str
    shipped: int  # ids in the shipped descriptor file
    present: int  # images the competition folder has now (train: with a label)
    added: list = field(default_factory=list)  # records present, not shipped: extracted here
    gone: list = field(default_factory=list)  # ids shipped, no longer present: left out

    @property
    def used(self) -> int:
        return self.shipped - len(self.gone)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.gone)

    def line(self) -> str:
        return (f"{self.split}: {self.used} shipped and present (used as shipped), {len(self.added)} present, not "
                f"shipped (extracted here after the test set), {len(self.gone)} shipped, no longer present (left out)")


def present_records(data: Path, split: str, labels: pd.Series | None, nonlandmark=None) -> list | None:
    """The images of ``split`` the competition has now, or None when there is nothing to compare with (no such
    folder; the non-landmark bank without ``--nonlandmark``). Train images without a label are not present."""
    from kernel.data.sources import folder_source, kaggle_split

    if split == "nonlandmark":
        return folder_source(nonlandmark) if nonlandmark else None
    if not (Path(data) / split).is_dir():
        return None
    t0 = time.monotonic()
    records = kaggle_split(Path(data), split)
    if split == "train" and labels is not None:
        labelled = labels.index.isin([r.id for r in records])
        keep = set(labels.index[labelled])
        unlabelled = len(records) - len(keep)
        records = [r for r in records if r.id in keep]
        if unlabelled:
            log.warning("%s: %d images have no landmark_id in the train labels: not used", Path(data) / split,
                        unlabelled)
    log.info("%s: %d images now (listed in %.1f s)", Path(data) / split, len(records), time.monotonic() - t0)
    return records


def compare(split: str, shipped_ids: np.ndarray, present: list) -> Coverage:
    """Sort the images of one model's shipped split against those present now."""
    present_ids = pd.Index([r.id for r in present])
    shipped = pd.Index(np.asarray(shipped_ids).astype(str))
    added = [r for r, is_shipped in zip(present, present_ids.isin(shipped)) if not is_shipped]
    gone = shipped[~shipped.isin(present_ids)].tolist()
    return Coverage(split, len(shipped), len(present), added, gone)


def common_added(stored: dict[str, set]) -> set:
    """The added ids every model holds (a deadline can stop the run-time extraction with some models
    further than others; the models' id sets must stay equal)."""
    sets = list(stored.values())
    return set.intersection(*sets) if sets else set()
