"""``python -m kernel extract``: the command's arguments and what it runs (:func:`kernel.extract.extract`)."""
from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import torch

from kernel.errors import KernelError
from kernel.extract.api import extract

log = logging.getLogger(__name__)

HELP = "extract descriptors of a split's images with the ensemble's models into the descriptor store"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from kernel.cli import number

    p.add_argument("--manifest", required=True, help="weights_manifest.json")
    p.add_argument("--weights", required=True, help="folder holding the checkpoints named in the manifest")
    p.add_argument("--images", required=True,
                   help="a Kaggle competition folder (uses its SPLIT folder), a folder of images, or a CSV id,path")
    p.add_argument("--split", required=True, help="split name (train, index, test, ...)")
    p.add_argument("--store", required=True, help="descriptor store folder")
    p.add_argument("--models", default=None, help="comma-separated subset of the manifest's models")
    p.add_argument("--track", choices=["recognition", "retrieval"], default=None,
                   help="only the models of this track")
    p.add_argument("--device", default=None, help="cuda (every visible GPU, one worker process each), cuda:N (that "
                   "GPU only) or cpu (default: every visible GPU, else the CPU)")
    p.add_argument("--batch-size", type=number(int, 1), default=None, help="images per batch (default 32 on CUDA, 8 on CPU; "
                   "halved per model on out-of-memory)")
    p.add_argument("--workers", type=number(int, 0), default=None,
                   help="decode processes (default: one per CPU core with CUDA, half of them on CPU)")
    p.add_argument("--group-size", type=number(int, 1), default=None,
                   help="models held at once (default: all that fit in half the device memory; 1 = model by model)")
    p.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default=None,
                   help="autocast precision (default fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="stored descriptor dtype")
    p.add_argument("--shard", default=None, help="i/n: this machine's share of the images (offline train/index); "
                   "default: torchrun's RANK/WORLD_SIZE when set")
    p.add_argument("--time-limit", type=number(float, 0, exclusive_min=True), default=None,
                   help="stop cleanly after this many seconds (resumable)")
    p.add_argument("--flush-images", type=number(int, 1), default=1024, help="write a shard every N images per model")
    p.add_argument("--flush-seconds", type=number(float, 0, exclusive_min=True), default=60.0, help="... or every S seconds")
    p.add_argument("--retry-failures", action="store_true", help="decode images that failed before again")
    p.add_argument("--overwrite", action="store_true", help="discard the store's descriptors of these models")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from kernel.data.sources import open_source, parse_shard
    from kernel.models import load_manifest, select

    entries = select(load_manifest(args.manifest), args.models, args.track)
    if not entries:
        raise KernelError(f"{args.manifest}: no model left after --models/--track")
    if not Path(args.weights).is_dir():
        raise KernelError(f"{args.weights}: weights folder not found")
    shard, device = None, args.device
    if args.shard:
        shard = parse_shard(args.shard)
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun: one shard per process
        shard = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
        if device is None and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    records = open_source(args.images, args.split)
    if not records:
        raise KernelError(f"{args.images}: no images found for split '{args.split}'")
    log.info("%s: %d images from %s%s", args.split, len(records), args.images,
             f" (shard {shard[0]}/{shard[1]})" if shard else "")
    deadline = time.monotonic() + args.time_limit if args.time_limit else None
    summary = extract(
        entries, args.weights, records, args.split, args.store, device=device, batch_size=args.batch_size,
        progress=not args.no_progress, deadline=deadline, workers=args.workers, group_size=args.group_size,
        precision=args.precision, dtype=args.dtype, flush_images=args.flush_images,
        flush_seconds=args.flush_seconds, shard=shard, retry_failures=args.retry_failures,
        overwrite=args.overwrite,
    )
    print(summary.line())
    return 0 if summary.complete or summary.stopped else 1
