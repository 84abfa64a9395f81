"""Packaging for Kaggle: checkpoints -> an uploadable dataset plus an offline notebook (``build_kernel.py``).

Modules, one idea each:

- :mod:`kernel.bundle.build`: the options (:class:`~kernel.bundle.build.BundleOptions`); validate everything,
  stage, publish ``out/`` in one rename;
- :mod:`kernel.bundle.checks`: the validation of every input (models, checkpoints, stores, labels, ``out``);
- :mod:`kernel.bundle.ship`: what goes into the dataset (package, checkpoints, stores, prepared artefacts, wheels);
- :mod:`kernel.bundle.convert`: head stripping / fp16 conversion of checkpoints, checked on real descriptors;
- :mod:`kernel.bundle.wheels`: the wheels for an offline ``pip install --no-index`` (cache or ``pip download``);
- :mod:`kernel.bundle.notebook`: the notebook's plain-Python cells and ``kernel-metadata.json``;
- :mod:`kernel.bundle.limits`: Kaggle's limits on one dataset (files, bytes) and the count of what it uploads;
- :mod:`kernel.bundle.report`: the size and content report.

Also available as ``python -m kernel bundle`` (same arguments as ``build_kernel.py``).
"""
from __future__ import annotations

import argparse
import logging
import shlex

HELP = "build the Kaggle dataset (package, checkpoints, wheels, stores) and the offline notebook to upload"

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from kernel.bundle.build import DEFAULT_DEADLINE_HOURS, DEFAULT_SLUG
    from kernel.bundle import notebook
    from kernel.bundle.convert import DEFAULT_FP16_TOLERANCE

    p.add_argument("--weights", required=True, help="folder with the checkpoints the manifest names")
    p.add_argument("--manifest", default=None,
                   help="weights_manifest.json (default: WEIGHTS/weights_manifest.json, else the repository's)")
    p.add_argument("--out", required=True, help="build folder: dataset/, notebook/, report.{txt,json} "
                   "(an earlier build there is replaced; anything else is refused)")
    p.add_argument("--user", required=True, help="Kaggle user name (owner of the dataset and the notebook)")
    p.add_argument("--slug", default=DEFAULT_SLUG, help=f"dataset slug, mounted at /kaggle/input/SLUG "
                   f"(default {DEFAULT_SLUG}); notebooks are SLUG-recognition / SLUG-retrieval")
    p.add_argument("--title", default=None, help="dataset title, 6-50 characters (default: 'SLUG bundle')")
    p.add_argument("--track", choices=["recognition", "retrieval", "both"], default="recognition",
                   help="competition(s) to build a notebook for (default recognition; both: notebook/recognition/ "
                   "and notebook/retrieval/)")
    p.add_argument("--models", default=None, help="comma-separated subset of the manifest's models "
                   "(default: every model serving the track)")
    p.add_argument("--store", default=None, help="precomputed descriptor store to ship (train, nonlandmark, "
                   "index splits); its meta.json must name the same checkpoints")
    p.add_argument("--index-store", default=None, help="precomputed index descriptors kept apart (retrieval)")
    p.add_argument("--train-labels", default=None, help="train.csv (id,landmark_id) to ship; required for the "
                   "retrieval track, whose competition has none")
    p.add_argument("--headless", action="store_true", help="our reading of 'headless': no notebook UI, a plain "
                   ".py script kernel (kernel_type 'script') with the same cells instead of an .ipynb")
    p.add_argument("--fp16", action="store_true", help="ship checkpoints in half precision (each checked: "
                   "per-image descriptor cosine to the original >= --fp16-tolerance)")
    p.add_argument("--fp16-tolerance", type=float, default=DEFAULT_FP16_TOLERANCE,
                   help=f"minimum per-image cosine for fp16 checkpoints (default {DEFAULT_FP16_TOLERANCE})")
    p.add_argument("--strip-heads", action=argparse.BooleanOptionalAction, default=True,
                   help="drop training heads and optimizer payload (default on; descriptors checked to be "
                   "identical)")
    p.add_argument("--check-images", type=int, default=4,
                   help="bundled sample photos used to check converted checkpoints (default 4)")
    p.add_argument("--wheel", action="append", default=None, metavar="NAME==VERSION|FILE.whl",
                   help="wheel to ship for the offline install (repeatable; default: timm at the version pinned "
                   "in requirements.txt)")
    p.add_argument("--wheel-dir", action="append", default=[], metavar="DIR",
                   help="folder of wheels searched before the cache and pip download (repeatable)")
    p.add_argument("--no-download", action="store_true", help="never run pip download (wheels from --wheel-dir "
                   "or the cache only)")
    p.add_argument("--license", default="other", help="dataset license name for dataset-metadata.json "
                   "(default 'other')")
    p.add_argument("--deadline-hours", type=float, default=DEFAULT_DEADLINE_HOURS,
                   help=f"the notebook's total budget, counted from its start (default {DEFAULT_DEADLINE_HOURS} "
                   "of Kaggle's 12 h)")
    p.add_argument("--predict-args", default="", help="extra arguments for 'python -m kernel predict' in the "
                   "notebook, e.g. \"--rerank two-stage\"")
    p.add_argument("--public", action="store_true", help="make the notebook public (default private)")
    p.add_argument("--accelerator", choices=list(notebook.ACCELERATORS), default="t4x2",
                   help="the notebook's Kaggle accelerator, written as machine_shape in kernel-metadata.json: t4x2 "
                   "(default, 'GPU T4 x2', what Kaggle gives today), p100 (retired: Kaggle runs it on the T4 x2 "
                   "and warns), cpu (no GPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from kernel.bundle.build import BundleOptions, build_bundle
    from kernel.bundle.report import render

    report = build_bundle(BundleOptions(
        args.weights, args.out, args.user, manifest=args.manifest, slug=args.slug, title=args.title,
        track=args.track, models=args.models, store=args.store, index_store=args.index_store,
        train_labels=args.train_labels, headless=args.headless, fp16=args.fp16, strip_heads=args.strip_heads,
        fp16_tolerance=args.fp16_tolerance, check_images=args.check_images, wheel_requirements=args.wheel,
        wheel_dirs=args.wheel_dir, allow_download=not args.no_download, license_name=args.license,
        deadline_hours=args.deadline_hours, predict_args=shlex.split(args.predict_args), private=not args.public,
        progress=not args.no_progress, accelerator=args.accelerator,
    ))
    print(render(report, full=False), end="")
    print(f"full file list: {args.out}/report.txt")
    return 0
