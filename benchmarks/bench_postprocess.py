"""Full post-processing against the bare cost of its similarity matrix products.

    .venv/bin/python benchmarks/bench_postprocess.py --queries 10000 --index 100000 --train 100000 \\
        --recognition-train 1000000 --bank 2000

* retrieval, soft up/down (2021), one model (512-d): k-NN labels of the queries and of the index against
  train (k = 3), the soft-scored top 750 of every query over the index, the ensemble sum and top 100;
  products: (queries + index) x train and queries x index.
* recognition (1536-d family descriptors): B(t) over the bank (top 5) for every train image, C(q) (top 10),
  the clipped, B-corrected top 3 over train and the vote; products: train x bank, queries x bank and
  queries x train.

Descriptors are clustered like landmark descriptors (landmark centres, views with noise; labels are the
landmarks). The floor runs the same products in the same blocks (``kernel.search.chunk_sizes``) into one
reused buffer and nothing else. Runs alternate (full, floor) ``--repeats`` times; fastest of each.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernel import search  # noqa: E402
from kernel.postprocess import knn, recognition as rec, retrieval as ret  # noqa: E402


def clustered(n: int, centres: np.ndarray, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows = normalise(centre + noise * gaussian / sqrt(dim)); returns (descriptors, centre of each row)."""
    rng = np.random.default_rng(seed)
    dim = centres.shape[1]
    labels = rng.integers(0, len(centres), n)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 1 << 16):
        e = min(n, s + (1 << 16))
        x = centres[labels[s:e]] + noise * rng.standard_normal((e - s, dim), dtype=np.float32) / np.sqrt(dim)
        out[s:e] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out, labels


def centres(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def floor(pairs: list[tuple[np.ndarray, np.ndarray, int]]) -> None:
    """The products of the pipeline: ``a @ b.T`` in :func:`kernel.search.topk`'s blocks, nothing else."""
    dev = torch.device("cpu")
    with torch.inference_mode():
        for a, b, k in pairs:
            qc, dc = search.chunk_sizes(len(a), len(b), min(k, len(b)), dev)
            at, bt = torch.from_numpy(a), torch.from_numpy(b)
            buf = torch.empty(qc * dc)
            for q0 in range(0, len(a), qc):
                qa = at[q0 : q0 + qc]
                for d0 in range(0, len(b), dc):
                    db = bt[d0 : d0 + dc]
                    torch.mm(qa, db.T, out=buf[: len(qa) * len(db)].view(len(qa), len(db)))


def retrieval_case(n_q: int, n_index: int, n_train: int, dim: int = 512, n_landmarks: int = 20000):
    c = centres(n_landmarks, dim, 0)
    q, _ = clustered(n_q, c, 1.2, 1)
    idx, _ = clustered(n_index, c, 1.2, 2)
    train, t_lab = clustered(n_train, c, 1.2, 3)

    def full():
        q_lab, _ = knn.knn_labels(q, train, t_lab, k=ret.KNN_K)
        i_lab, i_conf = knn.knn_labels(idx, train, t_lab, k=ret.KNN_K)
        scores, rows = ret.soft_scores(q, idx, q_lab, i_lab, i_conf, keep=ret.SOFT_KEEP)
        return ret.sum_ensemble([(scores, rows)], n_index, n_results=ret.N_RESULTS)

    pairs = [(q, train, ret.KNN_K), (idx, train, ret.KNN_K), (q, idx, ret.SOFT_KEEP)]
    return full, pairs


def recognition_case(n_q: int, n_train: int, n_bank: int, dim: int = 1536, n_landmarks: int = 20000):
    c = centres(n_landmarks, dim, 4)
    q, _ = clustered(n_q, c, 1.2, 5)
    train, t_lab = clustered(n_train, c, 1.2, 6)
    bank, _ = clustered(n_bank, centres(50, dim, 7), 1.5, 8)

    def full():
        return rec.recognize(q, train, t_lab, bank)

    pairs = [(train, bank, rec.BANK_K_TRAIN), (q, bank, rec.BANK_K_QUERY), (q, train, rec.KNN_K)]
    return full, pairs


def measure(name: str, case, repeats: int) -> dict:
    full, pairs = case
    t_full, t_floor = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        full()
        t_full.append(time.perf_counter() - t)
        t = time.perf_counter()
        floor(pairs)
        t_floor.append(time.perf_counter() - t)
    shapes = " + ".join(f"{len(a):.0e}x{len(b):.0e}x{a.shape[1]}" for a, b, _ in pairs)
    return {"case": name, "products": shapes, "full_s": min(t_full), "floor_s": min(t_floor),
            "ratio": min(t_full) / min(t_floor), "all_runs": {"full": t_full, "floor": t_floor}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=10000)
    p.add_argument("--index", type=int, default=100000)
    p.add_argument("--train", type=int, default=100000, help="train images of the retrieval case")
    p.add_argument("--recognition-train", type=int, default=1000000)
    p.add_argument("--bank", type=int, default=2000, help="non-landmark bank of the recognition case")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    machine = (f"{platform.machine()} {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
               f"load average at start {os.getloadavg()[0]:.1f}")
    print(machine)
    print("| post-processing | matrix products | full | products alone | ratio |")
    print("|---|---|---|---|---|")
    rows = []
    for name, case in (
        ("retrieval soft (1 model)", lambda: retrieval_case(args.queries, args.index, args.train)),
        ("recognition + bank", lambda: recognition_case(args.queries, args.recognition_train, args.bank)),
    ):
        r = measure(name, case(), args.repeats)
        rows.append(r)
        print(f"| {r['case']} | {r['products']} | {r['full_s']:.1f} s | {r['floor_s']:.1f} s | {r['ratio']:.2f}x |",
              flush=True)
    out = {"machine": machine, "load_average_end": os.getloadavg()[0], "results": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    print(json.dumps({**out, "results": [{k: v for k, v in r.items() if k != "all_runs"} for r in rows]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
