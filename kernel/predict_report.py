"""The record of one ``python -m kernel predict`` run: :class:`PredictReport`, kept on disk as
``<out stem>.log.json`` beside the submission (:func:`log_path`) from the fallback submission on, so that an
interrupted run leaves the decisions it made (``finished`` false)."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("kernel.predict")  # the run's decisions are the predict command's log lines


@dataclass
class PredictReport:
    track: str
    out: str
    test_images: int
    models: list = field(default_factory=list)  # models used in the final submission
    dropped: list = field(default_factory=list)
    decisions: list = field(default_factory=list)
    submissions: int = 0  # submissions written (fallback included)
    predicted: int = 0  # test ids with a non-empty prediction in the final file
    failures: dict = field(default_factory=dict)
    coverage: dict = field(default_factory=dict)  # split -> model -> shipped/present/used/added/gone/extracted
    seconds: float = 0.0
    finished: bool = False  # False in the log of a run that was interrupted or failed
    started: float = field(default_factory=time.monotonic, repr=False)

    def line(self) -> str:
        return (f"predict {self.track}: {self.predicted}/{self.test_images} test images predicted with "
                f"{len(self.models)} models ({', '.join(self.models) or 'none'}); "
                f"{len(self.dropped)} dropped; {len(self.failures)} unreadable images; "
                f"{self.submissions} submissions written; {self.seconds:.1f} s -> {self.out}")


def log_path(out) -> Path:
    """``<out>.log.json`` beside the submission (``submission.csv`` -> ``submission.log.json``)."""
    out = Path(out)
    return out.parent / f"{out.stem}.log.json"


def write_log(report: PredictReport) -> None:
    """The report so far, atomically: an interrupted run leaves the decisions it made (``finished`` false)."""
    from kernel.files import NoSpaceError, atomic_write

    report.seconds = time.monotonic() - report.started
    data = json.dumps({k: v for k, v in report.__dict__.items() if k != "started"}, indent=2, default=str)
    try:
        atomic_write(log_path(report.out), lambda fh: fh.write(data.encode()))
    except (OSError, NoSpaceError) as exc:  # the log never costs the submission
        log.warning("%s: cannot write the run log (%s)", log_path(report.out), exc)


def decide(report: PredictReport, message: str, *args) -> None:
    """Record a decision: in the report, in the log, and (once the fallback exists) in the log file."""
    text = message % args if args else message
    report.decisions.append(text)
    log.info(text)
    if report.submissions:  # from the fallback on, the log on disk follows the run
        write_log(report)
