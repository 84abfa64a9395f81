"""The smoke run proves the loop learns: held-out views of the bundled photos retrieve each other clearly
better after a short CPU training of a tiny model than before (CI variant: ``smoke --quick``)."""
import json
import subprocess
import sys

import pytest
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # end-to-end: subprocesses, whole runs (the fast loop skips them)


def test_quick_smoke_learns():
    proc = subprocess.run([sys.executable, "-m", "kernel.train", "smoke", "--quick", "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["classes"] == 13 and res["val_images"] == 39 and res["train_images"] == 91
    assert res["map_after"] > res["map_before"] + 0.1, res
    fam = res["families"]["effnet"]
    assert fam["gap_after"] > fam["gap_before"] + 0.2 and fam["train_loss_last"] < fam["train_loss_first"]
