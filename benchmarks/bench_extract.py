"""Extraction benchmark: is decoding ever the bottleneck?

Measures, on the device at hand and in one process:

1. decode cost per image (decode only, and decode + one resize per distinct model size), single process;
2. the bare forward: every model of the group on ready-made normalised tensors already on the device, at
   the pipeline's batch size and precision (fp16 autocast + channels_last on CUDA, fp32 on CPU);
3. the pipeline: ``kernel.extract.extract`` on the same images (decode workers, host-to-device copy,
   normalisation, NaN guard, shard writes), steady state = from the first finished batch to the last.

The goal (issue 3): pipeline images/s >= 90 % of the bare forward on a GPU, i.e. the device never waits for
decoding. Images are the bundled GLDv2 photos (489-800 px, like the competition's) replicated under new ids.

    python -m benchmarks.bench_extract --preset tiny  --images 256 --batch-size 16          # CPU, seconds
    python -m benchmarks.bench_extract --preset full  --images 512 --batch-size 32          # GPU
    python -m benchmarks.bench_extract --preset full  --models dolg_effnet_b5_768 --json out.json

Prints a Markdown table row set (for BENCHMARKS.md) and optionally writes the numbers as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from kernel.data.decode import decode_image, decode_resized
from kernel.data.loader import default_workers
from kernel.demo import SAMPLE_DIR
from kernel.extract import extract, resolve_device
from kernel.demo.weights import write_demo_weights
from kernel.models import build_model, load_manifest, select

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = sorted(SAMPLE_DIR.glob("*.jpg"))


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{cpu}, {default_workers()} cores available"
    if device.type == "cuda":
        desc = f"{torch.cuda.get_device_name(device)}; {desc}"
    return desc


def make_images(folder: Path, n: int) -> list[tuple[str, str]]:
    """``n`` records: the bundled photos copied under new ids (real JPEGs, real decode cost)."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        p = folder / f"{i:06d}.jpg"
        shutil.copy(SAMPLES[i % len(SAMPLES)], p)
        records.append((p.stem, str(p)))
    return records


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_decode(records, sizes) -> dict:
    """CPU milliseconds per image (process time: what a decode worker spends, whatever else runs)."""
    paths = [p for _, p in records][: min(len(records), 128)]
    for p in paths[:4]:
        decode_resized(p, sizes)  # warm the page cache and imports
    t0 = time.process_time()
    for p in paths:
        decode_image(p, min_side=max(sizes))
    t_dec = (time.process_time() - t0) / len(paths)
    t0 = time.process_time()
    for p in paths:
        decode_resized(p, sizes)
    t_all = (time.process_time() - t0) / len(paths)
    return {"decode_ms": 1e3 * t_dec, "decode_resize_ms": 1e3 * t_all}


def bench_loader(records, sizes, batch: int, workers: int, pin: bool) -> dict:
    """The decode side alone: how fast the loader can feed (images/s), with nothing else running."""
    from kernel.data.loader import make_loader

    t0 = time.perf_counter()
    n = sum(len(b["index"]) for b in make_loader(records, sizes, batch, workers=workers, pin_memory=pin))
    return {"loader_img_s": n / (time.perf_counter() - t0)}


def bench_bare(entries, device, batch: int, n_images: int, precision: str) -> dict:
    """Every model forward on ready tensors (same batch size, precision, memory format as the pipeline)."""
    per_model = {}
    total = 0.0
    for e in entries:
        model = build_model(e).eval().to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        s = e["image_size"]
        x = torch.randn(batch, 3, s, s, device=device)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        amp = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        with torch.inference_mode():
            for _ in range(2):  # warm-up (cudnn autotuning, allocator)
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    model(x)
            sync(device)
            steps = max(1, n_images // batch)
            t0 = time.perf_counter()
            for _ in range(steps):
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    model(x)
            sync(device)
            dt = (time.perf_counter() - t0) / (steps * batch)
        per_model[e["name"]] = 1.0 / dt
        total += dt
        del model, x
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"bare_img_s": 1.0 / total, "bare_per_model_img_s": per_model}


def bench_pipeline(entries, weights, records, device, batch: int, workers: int, precision: str, tmp: Path) -> dict:
    marks = []

    def on_batch(p):
        sync(device)
        marks.append((time.perf_counter(), p.done))

    store = tmp / "store"
    shutil.rmtree(store, ignore_errors=True)
    t0 = time.perf_counter()
    s = extract(entries, weights, records, "bench", store, device=str(device), batch_size=batch, progress=False,
                on_batch=on_batch, workers=workers, precision=precision, flush_images=4096)
    wall = time.perf_counter() - t0
    (t_a, n_a), (t_b, n_b) = marks[0], marks[-1]
    steady = (n_b - n_a) / (t_b - t_a) if t_b > t_a else float("nan")
    return {"pipeline_img_s": steady, "pipeline_wall_s": wall, "pipeline_wall_img_s": len(records) / wall,
            "decode_wait_s": s.decode_wait, "pipeline_per_model_img_s": {m: s.images_per_s(m) for m in s.models}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=["tiny", "full"], default="tiny")
    ap.add_argument("--models", default=None, help="comma-separated subset (default: all nine)")
    ap.add_argument("--images", type=int, default=256, help="number of images (default 256)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 32 on CUDA, 16 on CPU")
    ap.add_argument("--workers", type=int, default=None, help="decode workers (default: one per core)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--precision", default=None, choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--repeat", type=int, default=2,
                    help="bare and pipeline runs, interleaved; the best of each counts (default 2)")
    ap.add_argument("--json", default=None, help="write the numbers here")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    precision = args.precision or ("fp16" if device.type == "cuda" else "fp32")
    batch = args.batch_size or (32 if device.type == "cuda" else 16)
    workers = default_workers() if args.workers is None else args.workers
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
        tmp = Path(tmp)
        manifest = write_demo_weights(tmp / "weights", args.preset, args.models)
        entries = select(load_manifest(manifest), args.models)
        records = make_images(tmp / "images", args.images)
        sizes = sorted({e["image_size"] for e in entries})
        res = {"machine": machine(device), "load_avg_1min_before": os.getloadavg()[0], "device": str(device),
               "preset": args.preset, "precision": precision,
               "models": [e["name"] for e in entries], "images": len(records), "batch": batch, "workers": workers,
               "torch_threads": torch.get_num_threads(), "sizes": sizes}
        res.update(bench_decode(records, sizes))
        res.update(bench_loader(records, sizes, batch, workers, device.type == "cuda"))
        bare, pipe = [], []
        for _ in range(max(1, args.repeat)):  # interleaved, so both see the same machine load
            bare.append(bench_bare(entries, device, batch, len(records), precision))
            pipe.append(bench_pipeline(entries, tmp / "weights", records, device, batch, workers, precision, tmp))
        res.update(max(bare, key=lambda r: r["bare_img_s"]))
        res.update(max(pipe, key=lambda r: r["pipeline_img_s"]))
        res["runs"] = {"bare_img_s": [r["bare_img_s"] for r in bare],
                       "pipeline_img_s": [r["pipeline_img_s"] for r in pipe]}
    res["ratio"] = res["pipeline_img_s"] / res["bare_img_s"]
    res["decode_img_s_per_worker"] = 1e3 / res["decode_resize_ms"]
    res["load_avg_1min_after"] = os.getloadavg()[0]
    print(f"machine: {res['machine']} ({res['device']}, {precision}, torch threads {res['torch_threads']}); "
          f"1-min load average {res['load_avg_1min_before']:.1f} before, {res['load_avg_1min_after']:.1f} after")
    print(f"preset {args.preset}, {len(entries)} models, sizes {sizes}, {len(records)} images, batch {batch}, "
          f"{workers} decode workers; runs: bare {[round(x, 1) for x in res['runs']['bare_img_s']]} img/s, "
          f"pipeline {[round(x, 1) for x in res['runs']['pipeline_img_s']]} img/s")
    print("| machine | preset / models | batch | decode CPU ms/img (+ resize) | loader alone img/s | "
          "bare forward img/s | pipeline img/s (steady) | pipeline / bare | waited for decoding |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {res['machine']} ({device.type}, {precision}) | {args.preset} / {len(entries)} | {batch} | "
          f"{res['decode_ms']:.1f} ({res['decode_resize_ms']:.1f}) | {res['loader_img_s']:.0f} | "
          f"{res['bare_img_s']:.1f} | {res['pipeline_img_s']:.1f} | {100 * res['ratio']:.0f} % | "
          f"{res['decode_wait_s']:.2f} s of {res['pipeline_wall_s']:.1f} s |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
