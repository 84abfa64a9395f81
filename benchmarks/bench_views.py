"""Reading a reference split through a view (kernel.views) against reading the shipped file itself.

    python -m benchmarks.bench_views --rows 400000 --json benchmarks/results/views_cpu.json

On the scored rerun the train split is read through a view: the shipped file without the images gone, then the
images added at run time. This times a full block-by-block read (``Rows.blocks``, 65,536 rows a block, what a
streamed search does) of one model's float16 512-d split, in one process, alternating, best of ``--repeat``:

- ``file``: the shipped file as it is (a link; :class:`kernel.rows.SplitRows`);
- ``view, nothing left out``: a view that only points at it (where links are impossible);
- ``view, N gone + M added``: the rerun's case (a few shipped ids left out, a few images added);
- ``view, 1% gone``: many ids left out.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from kernel import store
from kernel.rows import open_split
from kernel.views import write_view


def _write(root: Path, rows: int, added: int) -> tuple[Path, list[str]]:
    rng = np.random.default_rng(0)
    ids = np.char.add("t", np.char.zfill(np.arange(rows).astype(str), 9))

    def blocks():
        for s in range(0, rows, 1 << 16):
            x = rng.standard_normal((min(rows, s + (1 << 16)) - s, 512), dtype=np.float32)
            yield (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)

    base = store.save_npz_streamed(store.split_path(root / "shipped", "m", "train"), ids, 512, np.float16, blocks())
    extra = rng.standard_normal((added, 512)).astype(np.float32)
    store.save_split(root / "work", "m", "train_added", [f"a{i}" for i in range(added)], extra)
    return base, ids.tolist()


def _read_all(store_dir: Path) -> float:
    rows = open_split(store_dir, "m", "train")
    t0 = time.perf_counter()
    total = 0.0
    for _, _, block in rows.blocks(1 << 16):
        total += float(block[:1, :1].sum())
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=400_000)
    p.add_argument("--gone", type=int, default=200)
    p.add_argument("--added", type=int, default=2_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, ids = _write(root, args.rows, args.added)
        rng = np.random.default_rng(1)
        cases = {"file": None, "view, nothing left out": ((), None),
                 f"view, {args.gone} gone + {args.added} added": (rng.choice(ids, args.gone, replace=False),
                                                                  "train_added"),
                 "view, 1% gone": (rng.choice(ids, args.rows // 100, replace=False), None)}
        folders = {}
        for k, (name, spec) in enumerate(cases.items()):
            folders[name] = root / f"case{k}"
            if spec is None:
                (folders[name] / "m").mkdir(parents=True)
                (folders[name] / "m" / "train.npz").symlink_to(base)
                continue
            if spec[1]:
                (folders[name] / "m").mkdir(parents=True)
                (folders[name] / "m" / "train_added.npz").symlink_to(store.split_path(root / "work", "m",
                                                                                       "train_added"))
            write_view(folders[name], "m", "train", base, exclude=spec[0], added=spec[1])
        best = {name: float("inf") for name in cases}
        for _ in range(args.repeat):
            for name, folder in folders.items():
                best[name] = min(best[name], _read_all(folder))
    base_s = best["file"]
    out = {"rows": args.rows, "dim": 512, "dtype": "float16", "seconds": best,
           "vs_file": {k: round(v / base_s, 3) for k, v in best.items()},
           "machine": {"cpu": platform.processor() or platform.machine()}}
    for name, s in best.items():
        print(f"{name:32s} {s:6.2f} s  ({s / base_s:.2f}x the file)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
