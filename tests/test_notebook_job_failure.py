"""The notebook's predict and check cells when the job fails late (a full disk, say): a checked submission with
predictions stands and the notebook ends without raising (Kaggle scores that file); a job that left only the empty
fallback still fails the notebook, loudly. The job is a stand-in program, so the cells run as they are."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kernel.bundle.notebook_cells import CELL_SOURCE

JOB = """#!{python}
import sys
out = sys.argv[sys.argv.index("--out") + 1]
with open(out, "w") as fh:
    fh.write("id,landmarks\\n" + "".join(f"{{i}},{{lm}}\\n" for i, lm in {rows!r}))
print("error: /kaggle/temp/kernel-work-recognition: no space left on the device (0 bytes free)")
sys.exit(2)
"""


def _run(tmp_path: Path, rows) -> tuple[list[str], BaseException | None]:
    competition = tmp_path / "comp"
    (competition / "test" / "a" / "b" / "c").mkdir(parents=True)
    for image_id, _ in rows:
        (competition / "test" / "a" / "b" / "c" / f"{image_id}.jpg").write_bytes(b"")
    job = tmp_path / "job.py"
    job.write_text(JOB.format(python=sys.executable, rows=list(rows)))
    job.chmod(0o755)
    printed = []
    ns = {"os": os, "sys": type("FakeSys", (), {"executable": str(job), "stdout": sys.stdout})(),
          "time": time, "subprocess": subprocess, "Path": Path, "START": time.time(), "DEADLINE_HOURS": 12.0,
          "TRACK": "recognition", "COMPETITION": competition, "DATASET": tmp_path / "dataset",
          "WORKING": tmp_path, "SUBMISSION": tmp_path / "submission.csv", "SCRATCH": tmp_path / "temp",
          "STORE": None, "INDEX_STORE": None, "TRAIN_LABELS": None, "DEVICE": None, "PREDICT_ARGS": [],
          "JOB_ENV": dict(os.environ), "print": lambda *a, **k: printed.append(" ".join(map(str, a)))}
    try:
        for cell in ("predict", "check_submission"):
            exec(compile(CELL_SOURCE[cell], f"<{cell} cell>", "exec"), ns)
    except SystemExit as exc:
        return printed, exc
    return printed, None


def test_a_late_failure_with_a_checked_submission_does_not_fail_the_notebook(tmp_path):
    printed, raised = _run(tmp_path, [("a1", "1005 0.9"), ("b2", "")])
    assert raised is None, raised
    text = "\n".join(printed)
    assert "predict exited with status 2" in text and "submission it left (1 predictions) stands" in text


def test_only_the_empty_fallback_fails_the_notebook(tmp_path):
    _, raised = _run(tmp_path, [("a1", ""), ("b2", "")])
    assert raised is not None and "before any prediction" in str(raised)


@pytest.mark.parametrize("with_csv", [True, False])
def test_the_competitions_own_train_csv_wins_over_the_shipped_one(tmp_path, with_csv):
    competition = tmp_path / "comp"
    competition.mkdir()
    if with_csv:
        (competition / "train.csv").write_text("id,landmark_id\n")
    printed = []
    ns = {"COMPETITION": competition, "TRAIN_LABELS": "train.csv", "DATASET": tmp_path / "dataset", "cmd": [],
          "print": lambda *a, **k: printed.append(" ".join(map(str, a)))}
    source = CELL_SOURCE["predict"]
    start = source.index("# the competition's own train.csv")
    exec(source[start : source.index("if DEVICE:")], ns)
    assert ns["cmd"] == ([] if with_csv else ["--train-labels", str(tmp_path / "dataset" / "train.csv")])
