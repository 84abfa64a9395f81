"""The notebook's first printed line says which run this is, the public folder or the scored rerun, from what the
competition folder holds at run time against the public sizes of kernel/sizes.py (put into the cell, not copied)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from kernel import sizes
from kernel.bundle import notebook
from kernel.bundle.notebook_cells import CELL_SOURCE, CODE_CELLS


@pytest.fixture(scope="module")
def competition(tmp_path_factory):
    from kernel.demo.competition import make_competition, sample_photos

    return make_competition(tmp_path_factory.mktemp("comp"), seed=5, photos=sample_photos()[:4])


def _run_cell(track: str, folder: Path) -> tuple[dict, list[str]]:
    printed = []
    ns = {"os": os, "TRACK": track, "COMPETITION": folder,
          "print": lambda *a, **k: printed.append(" ".join(map(str, a)))}
    exec(compile(CELL_SOURCE["which_run"], "<which run cell>", "exec"), ns)
    return ns, printed


def _images(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*.jpg"))


def test_the_cell_carries_the_public_sizes_and_comes_first():
    cell = CELL_SOURCE["which_run"]
    assert f"PUBLIC_SIZES = {sizes.PUBLIC!r}" in cell and "def which_run(" in cell
    assert CODE_CELLS[0] == "which_run"
    kinds = notebook.cells("# config", "intro")
    assert kinds[2] == ("code", cell)  # right after the configuration: the notebook's first printed line


def test_recognition_sizes_other_than_the_public_ones_are_the_scored_rerun(competition):
    folder = competition.recognition
    ns, printed = _run_cell("recognition", folder)
    rows = len((folder / "train.csv").read_text().splitlines()) - 1
    found = {"test": _images(folder / "test"), "train_rows": rows}
    assert ns["RUN_FOUND"] == found
    assert printed == [f"this run: the scored rerun, not the public recognition folder: test {found['test']} "
                       f"(public 10000), train_rows {rows} (public 1580470)"]
    # the same folder, were its sizes the public ones: the public run
    ns["PUBLIC_SIZES"] = {"recognition": dict(found)}
    ns["report_run"]()
    assert printed[-1] == (f"this run: the public recognition folder (test {found['test']}, train_rows {rows}: "
                           "the public sizes)")


def test_retrieval_counts_queries_and_index_images_and_says_when_it_cannot_tell(competition, tmp_path):
    folder = competition.retrieval
    ns, printed = _run_cell("retrieval", folder)
    assert ns["RUN_FOUND"] == {"test": _images(folder / "test"), "index": _images(folder / "index")}
    assert printed[0].startswith("this run: the scored rerun, not the public retrieval folder: test ")
    bare = tmp_path / "bare"
    shutil.copytree(folder / "test", bare / "test")
    _, printed = _run_cell("retrieval", bare)
    assert printed == ["this run: cannot tell the public retrieval folder from the scored rerun (index not found)"]
