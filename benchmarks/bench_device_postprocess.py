"""Post-processing on a GPU against this machine's CPU, in one call, on the same synthetic store.

    python -m benchmarks.bench_device_postprocess --train 400000 --root /tmp/devpp \\
        --json benchmarks/results/postprocess_h200.json

The store is the rehearsal's (``python -m kernel rehearse``: float16 ``.npz``, 512-d, the eight models, a
non-landmark bank; kept under ``--root`` and reused by a later run of the same sizes). Each mode runs
``python -m kernel postprocess --track T`` in its own child process with ``--memory-gb`` and no prepared
artefacts (everything computed):

- ``cuda``: the database side of every search stays whole on the GPU when it takes at most half of the free
  device memory (``kernel.search.pass_rows``): the resident path a big card takes;
- ``cuda-streamed``: the same run with the card reported full (``torch.cuda.mem_get_info`` answers 0 free
  bytes in the child), so every database is streamed from host memory a pass at a time, as on a card too
  small for it (a T4's 16 GB at 1.58 M train images);
- ``cpu``: ``--device cpu`` on every core of this machine: the baseline.

Reported per mode: wall time, the child's peak resident memory (its own high-water mark), its ratio to the
CPU's time, and its submission compared with the CPU's (rows equal; the products are float32 on both, so
only near-ties in another summation order may differ).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import pandas as pd

from kernel import rehearse

MODES = ("cuda", "cuda-streamed", "cpu")


def _child(mode: str, argv: list[str]) -> int:
    """In the child: make the card look full for ``cuda-streamed``, then run ``python -m kernel ARGV``."""
    import torch

    from kernel.cli import main

    if mode == "cuda-streamed":
        total = torch.cuda.mem_get_info()[1]
        torch.cuda.mem_get_info = lambda device=None: (0, total)
    return main(argv)


def compare(a: Path, b: Path) -> dict:
    """Rows of two submissions (same ids) whose answers are equal, and the ids' agreement."""
    x = pd.read_csv(a, dtype=str, keep_default_na=False).set_index("id").sort_index()
    y = pd.read_csv(b, dtype=str, keep_default_na=False).set_index("id").sort_index()
    same_ids = x.index.equals(y.index)
    col = x.columns[0]
    equal = int((x[col] == y[col]).sum()) if same_ids else 0
    return {"rows": len(x), "same_ids": same_ids, "rows_equal": equal}


def run(args) -> dict:
    root = Path(args.root) / f"train{args.train}"
    ns = argparse.Namespace(train=args.train, index=args.index, test=args.test, bank=args.bank, models=args.models)
    desc = rehearse._ensure_store(root, ns)
    retrieval_models = rehearse.retrieval_models_of(root / "store", args.retrieval_models)
    rows = []
    for track in args.tracks:
        subs = {}
        for mode in args.modes:
            sub = root / f"{track}_{mode}.csv"
            cmd = ["--child", mode, "--", "postprocess", "--track", track, "--store", str(root / "store"),
                   "--train-labels", str(root / "train.csv"), "--out", str(sub), "--memory-gb", str(args.memory_gb),
                   "--no-progress", "--prepared", str(root / "no-prepared"),
                   "--device", "cpu" if mode == "cpu" else "cuda"]
            if track == "retrieval":
                cmd += ["--models", ",".join(retrieval_models)]
            r = rehearse.run_child(cmd, root / f"{track}_{mode}.log", module="benchmarks.bench_device_postprocess")
            r.update(track=track, mode=mode)
            subs[mode] = sub
            rows.append(r)
            print(f"{track:12s} {mode:14s} {r['seconds']:7.1f} s  peak {r['peak_rss_gib']:.2f} GiB  exit {r['returncode']}",
                  flush=True)
        for r in rows:
            if r["track"] == track and "cpu" in subs and r["returncode"] == 0 and subs["cpu"].is_file():
                base = next(x for x in rows if x["track"] == track and x["mode"] == "cpu")
                r["vs_cpu"] = round(r["seconds"] / base["seconds"], 3)
                r["submission_vs_cpu"] = compare(subs[r["mode"]], subs["cpu"])
    import torch

    return {"store": desc, "memory_gb": args.memory_gb, "results": rows,
            "machine": {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                        "torch": torch.__version__}}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return _child(argv[1], argv[3:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="/tmp/bench_device_postprocess", help="stores are kept here and reused")
    p.add_argument("--train", type=int, default=400_000)
    p.add_argument("--index", type=int, default=20_000)
    p.add_argument("--test", type=int, default=10_000)
    p.add_argument("--bank", type=int, default=2_000)
    p.add_argument("--models", type=int, default=8)
    p.add_argument("--retrieval-models", type=int, default=None)
    p.add_argument("--tracks", nargs="+", default=["recognition"], choices=["recognition", "retrieval"])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--memory-gb", type=float, default=10.0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    out = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0 if all(r["returncode"] == 0 for r in out["results"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
