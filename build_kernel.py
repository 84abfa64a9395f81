#!/usr/bin/env python
"""Build the Kaggle dataset and offline notebook from checkpoints, in one reproducible command.

    python build_kernel.py --weights DIR [--manifest weights_manifest.json] --out build/ --user USER
        [--slug SLUG] [--track recognition|retrieval|both] [--store S] [--index-store S2]
        [--train-labels CSV] [--headless] [--fp16] [--accelerator t4x2|p100|cpu]

Writes ``build/dataset/`` (upload with ``kaggle datasets create -p build/dataset --dir-mode zip``),
``build/notebook/`` (``kaggle kernels push -p build/notebook``) and ``build/report.txt``. Everything is
checked before anything is written; see :mod:`kernel.bundle` and ``--help``.
"""
from __future__ import annotations

import argparse
import sys

from kernel.bundle import HELP, add_arguments, run
from kernel.cli import add_trust_argument, run_command


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="build_kernel.py", description=HELP)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_arguments(parser)
    add_trust_argument(parser)
    args = parser.parse_args(argv)
    return run_command(run, args, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
