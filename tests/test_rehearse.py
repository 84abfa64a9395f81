"""`rehearse`: a synthetic store of a chosen size in the real format, both tracks under the budget."""
import json
import subprocess
import sys

import numpy as np
import pytest

from kernel import store
from kernel.rows import SplitRows
from kernel.submission import check_submission
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # end-to-end: subprocesses, whole runs (the fast loop skips them)


def _rehearse(out, *extra):
    return subprocess.run([sys.executable, "-m", "kernel", "rehearse", "--out", str(out), "--train", "3000",
                           "--index", "400", "--test", "150", "--bank", "40", "--models", "3", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_rehearsal_runs_both_tracks_and_reports_peak_memory(tmp_path):
    out = tmp_path / "r"
    res = _rehearse(out, "--memory-gb", "6")
    assert res.returncode == 0, res.stdout + res.stderr
    result = json.loads((out / "rehearsal_result.json").read_text())
    assert [r["track"] for r in result["results"]] == ["recognition", "retrieval"]
    for r in result["results"]:
        assert r["returncode"] == 0 and 0.05 < r["peak_rss_gib"] <= 6 and r["within_budget"]
        assert r["projected_kaggle_s"] > 0 and r["tflop"] > 0
        test_ids = [f"te{i:09d}" for i in range(150)]
        check_submission(r["track"], out / f"{r['track']}_submission.csv", test_ids)
    assert "peak" in res.stdout and "GiB" in res.stdout
    # the store is the real format: float16, streamable, every split of every model
    rows = SplitRows(store.split_path(out / "store", "dolg_effnet_b5_768", "train"))
    assert rows.stored_dtype == np.float16 and rows.layout is not None and len(rows) == 3000
    np.testing.assert_allclose(np.linalg.norm(rows.block(0, 100), axis=1), 1, atol=2e-3)
    # a second rehearsal of the same sizes reuses the store
    again = _rehearse(out, "--tracks", "recognition")
    assert again.returncode == 0 and "reusing the rehearsal store" in again.stderr
    before = sorted(p.name for p in (out / "store").iterdir())
    other = subprocess.run([sys.executable, "-m", "kernel", "rehearse", "--out", str(out), "--train", "2000"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert other.returncode == 2 and "holds a rehearsal of other sizes" in other.stderr
    assert sorted(p.name for p in (out / "store").iterdir()) == before


def test_rehearsal_over_budget_fails_and_foreign_folder_is_refused(tmp_path):
    res = _rehearse(tmp_path / "r", "--memory-gb", "0.05", "--tracks", "recognition")
    assert res.returncode == 1 and "OVER" in res.stdout
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    res = _rehearse(foreign)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error:")
    assert (foreign / "keep.txt").read_text() == "mine" and sorted(p.name for p in foreign.iterdir()) == ["keep.txt"]


def test_peak_rss_sees_a_large_allocation():
    """In a fresh small process: touching 300 MiB moves the peak by about that much."""
    code = ("from kernel.memory import peak_rss_gib; import numpy as np; a = peak_rss_gib(); "
            "b = np.ones(300 * 2**20 // 8); b.sum(); print(a, peak_rss_gib())")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    before, after = map(float, res.stdout.split())
    assert before < 0.2 and 0.27 < after - before < 0.4
