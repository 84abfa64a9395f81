"""Full post-processing against the bare cost of its similarity matrix products.

    python -m benchmarks.bench_postprocess --queries 10000 --index 100000 --train 100000 \\
        --recognition-train 100000 1000000 --bank 2000

* retrieval, soft up/down (2021), one model (512-d): k-NN labels of the queries and of the index against
  train (k = 3), the soft-scored top 750 of every query over the index, the ensemble sum and top 100;
  products: (queries + index) x train and queries x index.
* recognition (1536-d family descriptors): B(t) over the bank (top 5) for every train image, C(q) (top 10),
  the clipped, B-corrected top 3 over train and the vote; products: train x bank, queries x bank and
  queries x train.

Descriptors are clustered like landmark descriptors (landmark centres, views with noise; labels are the
landmarks). The floor runs the same products in the same blocks (``kernel.search.chunk_sizes``) and the
same dtype (bfloat16 where the search's prefilter is on, see ``kernel.prefilter``) into one reused buffer and
nothing else; the all-float32 floor is reported next to it. Runs alternate (full, floor) ``--repeats`` times; fastest of each.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from kernel import prefilter, search
from kernel.postprocess import knn, recognition as rec, retrieval as ret


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


def product_dtype(a: np.ndarray, b: np.ndarray, k: int, scored: bool) -> torch.dtype:
    """The dtype :func:`kernel.search.topk` multiplies in: bfloat16 where its prefilter is on (plain
    searches on a CPU with fast bfloat16 products), float32 otherwise (re-scored searches)."""
    use = prefilter.use_prefilter("auto", torch.device("cpu"), torch.float32, (lambda *x: x) if scored else None,
                                  len(a), len(b), min(k, len(b)))
    return torch.bfloat16 if use else torch.float32


def floor(pairs: list[tuple[np.ndarray, np.ndarray, int, bool]], as_searched: bool = True) -> None:
    """The products of the pipeline: ``a @ b.T`` in :func:`kernel.search.topk`'s blocks and dtype
    (``as_searched``; else all in float32), nothing else."""
    dev = torch.device("cpu")
    with torch.inference_mode():
        for a, b, k, scored in pairs:
            dt = product_dtype(a, b, k, scored) if as_searched else torch.float32
            qc, dc = search.chunk_sizes(len(a), len(b), min(k, len(b)), dev)
            at, bt = torch.from_numpy(a).to(dt), torch.from_numpy(b).to(dt)
            buf = torch.empty(qc * dc, dtype=dt)
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

    pairs = [(q, train, ret.KNN_K, False), (idx, train, ret.KNN_K, False), (q, idx, ret.SOFT_KEEP, True)]
    return full, pairs


def recognition_case(n_q: int, n_train: int, n_bank: int, dim: int = 1536, n_landmarks: int = 20000):
    c = centres(n_landmarks, dim, 4)
    q, _ = clustered(n_q, c, 1.2, 5)
    train, t_lab = clustered(n_train, c, 1.2, 6)
    bank, _ = clustered(n_bank, centres(50, dim, 7), 1.5, 8)

    def full():
        return rec.recognize(q, train, t_lab, bank)

    pairs = [(train, bank, rec.BANK_K_TRAIN, False), (q, bank, rec.BANK_K_QUERY, False), (q, train, rec.KNN_K, True)]
    return full, pairs


def measure(name: str, case, repeats: int) -> dict:
    full, pairs = case
    t_full, t_floor, t_f32 = [], [], []
    mixed = any(product_dtype(a, b, k, s) != torch.float32 for a, b, k, s in pairs)
    for _ in range(repeats):
        t = time.perf_counter()
        full()
        t_full.append(time.perf_counter() - t)
        t = time.perf_counter()
        floor(pairs)
        t_floor.append(time.perf_counter() - t)
        if mixed:
            t = time.perf_counter()
            floor(pairs, as_searched=False)
            t_f32.append(time.perf_counter() - t)
    shapes = " + ".join(
        f"{len(a):.0e}x{len(b):.0e}x{a.shape[1]} ({'bf16' if product_dtype(a, b, k, s) == torch.bfloat16 else 'fp32'})"
        for a, b, k, s in pairs)
    f32 = min(t_f32) if t_f32 else min(t_floor)
    return {"case": name, "products": shapes, "full_s": min(t_full), "floor_s": min(t_floor),
            "ratio": min(t_full) / min(t_floor), "float32_floor_s": f32, "ratio_to_float32_floor": min(t_full) / f32,
            "all_runs": {"full": t_full, "floor": t_floor, "float32_floor": t_f32}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=10000)
    p.add_argument("--index", type=int, default=100000)
    p.add_argument("--train", type=int, default=100000, help="train images of the retrieval case")
    p.add_argument("--recognition-train", type=int, nargs="+", default=[100000, 1000000],
                   help="train images of the recognition case (one run per value)")
    p.add_argument("--bank", type=int, default=2000, help="non-landmark bank of the recognition case")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    machine = (f"{platform.machine()} {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
               f"load average at start {os.getloadavg()[0]:.1f}")
    print(machine)
    print("| post-processing | matrix products (dtype as searched) | full | products alone | ratio | "
          "all products in float32 | ratio |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    cases = [("retrieval soft (1 model)", lambda: retrieval_case(args.queries, args.index, args.train))]
    cases += [("recognition + bank", lambda n=n: recognition_case(args.queries, n, args.bank))
              for n in args.recognition_train]
    for name, case in cases:
        r = measure(name, case(), args.repeats)
        rows.append(r)
        print(f"| {r['case']} | {r['products']} | {r['full_s']:.1f} s | {r['floor_s']:.1f} s | {r['ratio']:.2f}x | "
              f"{r['float32_floor_s']:.1f} s | {r['ratio_to_float32_floor']:.2f}x |", flush=True)
    out = {"machine": machine, "load_average_end": os.getloadavg()[0], "results": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    print(json.dumps({**out, "results": [{k: v for k, v in r.items() if k != "all_runs"} for r in rows]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
