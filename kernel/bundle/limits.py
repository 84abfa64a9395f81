"""Kaggle's limits on one dataset, and the count of what a build's dataset folder uploads
(docs/kaggle.md#dataset-limits).

The build checks twice: from its inputs before anything is written (a lower bound: what is copied byte for
byte, see :func:`kernel.bundle.ship.least_upload`), and on the staged folder before it is published (exact).
Either way an upload over a limit raises :class:`KernelError`: one line naming the count, the limit and what
to ship less of.

Sources (read 2026-12):

- the file limit: Kaggle's answer to an upload of more files, "Dataset version creation error: The file count
  exceeds the maximum of 1000", quoted in github.com/whirlwide/candlestick_retriever issue #15 (2020-09-06);
- the size limit: "a max size of 200GB" per dataset, from Kaggle's datasets documentation
  (www.kaggle.com/docs/datasets), quoted in github.com/osirislab/LeakyPastes-V2 issue #2 (2025-04-07).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from kernel.bundle.report import human
from kernel.errors import KernelError

#: files in one Kaggle dataset (source: module docstring); our reading: counted once Kaggle has unpacked the
#: per-folder archives of ``kaggle datasets create --dir-mode zip``, i.e. every file the notebook sees
MAX_DATASET_FILES = 1000
#: bytes of one Kaggle dataset (source: module docstring); our reading: decimal gigabytes, unpacked sizes
MAX_DATASET_BYTES = 200 * 10**9
#: read by the ``kaggle`` tool as the request's metadata, not uploaded as a file of the dataset
NOT_UPLOADED = frozenset({"dataset-metadata.json"})
DOCS = "docs/kaggle.md#dataset-limits"


@dataclass
class Upload:
    """What a dataset uploads: ``{relative posix path: size in bytes}``."""

    sizes: dict = field(default_factory=dict)

    @property
    def files(self) -> int:
        return len(self.sizes)

    @property
    def bytes(self) -> int:
        return sum(self.sizes.values())

    def busiest_folder(self) -> tuple[str, int]:
        """The folder holding the most files directly, and how many."""
        counts = Counter(str(PurePosixPath(rel).parent) for rel in self.sizes)
        folder, n = counts.most_common(1)[0] if counts else (".", 0)
        return ("the dataset's top level" if folder == "." else f"{folder}/"), n

    def largest_entry(self) -> tuple[str, int]:
        """The top-level file or folder taking the most bytes, and how many."""
        sizes = Counter()
        for rel, size in self.sizes.items():
            top = rel.split("/", 1)
            sizes[top[0] + ("/" if len(top) > 1 else "")] += size
        return sizes.most_common(1)[0] if sizes else ("-", 0)

    def summary(self) -> dict:
        """The report's record: the count and bytes, with the limits they were checked against."""
        return {"files": self.files, "bytes": self.bytes, "max_files": MAX_DATASET_FILES,
                "max_bytes": MAX_DATASET_BYTES}


def upload_of(dataset: Path) -> Upload:
    """Every file under ``dataset`` that ``kaggle datasets create -p dataset --dir-mode zip`` uploads: all of
    them (hidden ones too, folders recursively) but :data:`NOT_UPLOADED` at the top."""
    dataset = Path(dataset)
    sizes = {}
    for p in sorted(dataset.rglob("*")):
        rel = p.relative_to(dataset).as_posix()
        if p.is_file() and rel not in NOT_UPLOADED:
            sizes[rel] = p.stat().st_size
    return Upload(sizes)


def check_upload(upload: Upload, at_least: bool = False) -> None:
    """Refuse an upload over :data:`MAX_DATASET_FILES` or :data:`MAX_DATASET_BYTES`; ``at_least``: the
    upload is a lower bound (the check before anything is written)."""
    more = " or more" if at_least else ""
    if upload.files > MAX_DATASET_FILES:
        folder, n = upload.busiest_folder()
        raise KernelError(
            f"the dataset would upload {upload.files:,} files{more}, Kaggle takes at most {MAX_DATASET_FILES:,} per "
            f"dataset ({DOCS}); {n:,} of them are in {folder}: ship fewer files (a subset of --models, no "
            "--index-store)")
    if upload.bytes > MAX_DATASET_BYTES:
        entry, n = upload.largest_entry()
        raise KernelError(
            f"the dataset would upload {upload.bytes:,} bytes ({human(upload.bytes)}){more}, Kaggle takes at most "
            f"{MAX_DATASET_BYTES:,} ({human(MAX_DATASET_BYTES)}) per dataset ({DOCS}); {entry} takes {human(n)}: "
            "ship less (a subset of --models, --fp16 checkpoints, a store with fewer splits)")
