"""Throughput of one training step of the tiny models: training images per second on each device and precision,
in one call, on the same generated data.

    python -m benchmarks.bench_train --runs cpu:fp32 cuda:fp16 cuda:bf16 --json benchmarks/results/train_h200.json

The data are views of the bundled sample photos (``kernel.train.smoke.make_views``, the GLDv2 folder layout and
``train.csv``); each run is ``python -m kernel.train fit`` of one recipe step with the tiny demo architecture of
``--recipe`` (random init, no validation hold-out beyond a few images) for ``--epochs`` epochs; the number is the
last epoch's ``train_images_per_s`` (loading, forward, loss, backward and optimiser step; the first epoch holds
the warm-up). The tiny models are small enough that the rate is bounded by the loop and the decoding, not by the
GPU: it shows that the loop runs on the device at a usable rate, not what a full-size model reaches.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

from kernel.demo.weights import write_demo_weights
from kernel.train.cli import main as train_main
from kernel.train.smoke import make_views


def run_one(data: Path, manifest: Path, out: Path, device: str, precision: str, args) -> dict:
    argv = ["fit", "--recipe", args.recipe, "--step", "1", "--data", str(data), "--images", str(data),
            "--out", str(out), "--manifest", str(manifest), "--workers", str(args.workers), "--val-fraction", "0.05",
            "--random-init", "--device", device, "--precision", precision, "--set", f"image_size={args.image_size}",
            "--set", f"batch_size={args.batch_size}", "--set", f"epochs={args.epochs}", "--set", "stop_at=null"]
    code = train_main(argv)
    hist = [json.loads(x) for x in (out / "step1" / "history.jsonl").read_text().splitlines()] if code == 0 else []
    return {"device": device, "precision": precision, "exit": code,
            "images_per_s": hist[-1]["train_images_per_s"] if hist else None,
            "epochs": [{k: h.get(k) for k in ("epoch", "train_loss", "train_images_per_s")} for h in hist]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", default=["cpu:fp32", "cuda:fp16", "cuda:bf16"], help="DEVICE:PRECISION")
    p.add_argument("--recipe", default="effnet_b6_512")
    p.add_argument("--views", type=int, default=24, help="views per sample photo (13 photos)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = write_demo_weights(tmp / "weights", "tiny")
        make_views(tmp / "data", views=args.views, view_size=args.image_size, seed=0)
        for run in args.runs:
            device, precision = run.split(":")
            if device.startswith("cuda") and not torch.cuda.is_available():
                print(f"{run}: skipped, no CUDA GPU here")
                continue
            r = run_one(tmp / "data", manifest, tmp / run.replace(":", "_"), device, precision, args)
            rows.append(r)
            print(f"{run:12s} {r['images_per_s']} training images/s (exit {r['exit']})", flush=True)
    out = {"runs": rows, "settings": {k: v for k, v in vars(args).items() if k != "json"},
           "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                       "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0 if rows and all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
