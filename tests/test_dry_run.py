"""`python -m kernel dry-run`: the README's first command works from a clean checkout."""
import json
import subprocess
import sys

import pandas as pd
import pytest
from PIL import Image

from kernel.submission import check_submission
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # end-to-end: subprocesses, whole runs (the fast loop skips them)


def test_dry_run_end_to_end(tmp_path):
    out = tmp_path / "dry"
    r = subprocess.run([sys.executable, "-m", "kernel", "dry-run", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dry-run (tiny preset) finished" in r.stdout
    result = json.loads((out / "dry_run.json").read_text())
    comp = out / "competition"
    for track, folder in (("recognition", "landmark-recognition"), ("retrieval", "landmark-retrieval")):
        sub = out / track / "submission.csv"
        test_ids = pd.read_csv(comp / folder / "sample_submission.csv", dtype=str)["id"].tolist()
        summary = check_submission(track, sub, test_ids)
        assert summary["rows"] == len(test_ids)
        assert 0.0 <= result[track]["score"] <= 1.0
        assert "8 models" in result[track]["report"]
        assert "1 unreadable images" in result[track]["report"]
    # views of the same photos: even random demo weights retrieve far better than chance
    assert result["retrieval"]["score"] > 0.3
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[0] > 500 and sheet.size[1] > 300
