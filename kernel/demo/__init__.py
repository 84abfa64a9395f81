"""The demo: everything that lets the kernel run end to end without real weights or competition data.

- :mod:`kernel.demo.competition`: a small sample competition (both Kaggle layouts) built from the thirteen
  Google-Landmarks photos in ``sample_data/gldv2`` (see its ``NOTICE``);
- :mod:`kernel.demo.weights`: seeded random checkpoints in the original layouts (``python -m kernel demo-weights``);
- :mod:`kernel.demo.dryrun`: the whole Kaggle job on the sample competition (``python -m kernel dry-run``).
"""
from __future__ import annotations

from pathlib import Path

SAMPLE_DIR = Path(__file__).resolve().parent / "sample_data" / "gldv2"  # the thirteen photos and their NOTICE
