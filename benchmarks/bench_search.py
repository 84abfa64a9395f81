"""Exact top-k: ``kernel.search.topk`` against faiss-cpu ``IndexFlatIP`` on the same data and machine.

    python -m benchmarks.bench_search --queries 10000 --database 100000 1000000

For every database size: L2-normalised Gaussian descriptors (seeded), k = 100, D = 512. Runs alternate
(faiss, ours, bare products) ``--repeats`` times so that a busy machine slows all three alike; the table
reports the fastest run of each. "float32 products" is the floor of the float32 search: the same
blocked matrix products without any selection; "bfloat16 products" the floor of the search with the
bfloat16 prefilter (used where ``kernel.prefilter.bf16_prefilter_available()``: this CPU multiplies bfloat16
faster), which then rescores its candidates in float32. Agreement: the share of identical (query, rank) ids, the largest score
difference, and whether every differing id is a float-rounding near-tie (exact scores within 1e-5).
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

from kernel import prefilter as bf16, search


def unit_gaussian(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 1 << 17):  # in slices: no float64 temporaries of the whole matrix
        x = rng.standard_normal((min(n, s + (1 << 17)) - s, dim), dtype=np.float32)
        out[s : s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def products_only(q: np.ndarray, d: np.ndarray, k: int, dtype: torch.dtype = torch.float32) -> None:
    """The matrix products of :func:`kernel.search.topk` (same blocks, same buffer), nothing else."""
    dev = torch.device("cpu")
    qc, dc = search.chunk_sizes(len(q), len(d), k, dev)
    qt, dt = torch.from_numpy(q).to(dtype), torch.from_numpy(d).to(dtype)
    buf = torch.empty(qc * dc, dtype=dtype)
    with torch.inference_mode():
        for q0 in range(0, len(q), qc):
            qb = qt[q0 : q0 + qc]
            for d0 in range(0, len(d), dc):
                db = dt[d0 : d0 + dc]
                torch.mm(qb, db.T, out=buf[: len(qb) * len(db)].view(len(qb), len(db)))


def agreement(q, d, ours, theirs) -> dict:
    (v, i), (fv, fi) = ours, theirs
    diff = i != fi
    r, c = np.nonzero(diff)
    a = np.einsum("ij,ij->i", q[r].astype(np.float64), d[i[r, c]].astype(np.float64))
    b = np.einsum("ij,ij->i", q[r].astype(np.float64), d[fi[r, c]].astype(np.float64))
    return {
        "same_ids": float(1 - diff.mean()),
        "max_score_diff": float(np.abs(v - fv).max()),
        "differing_are_near_ties": bool(np.all(np.abs(a - b) < 1e-5)),
        "differing": int(diff.sum()),
    }


def run(n_q: int, n_db: int, dim: int, k: int, repeats: int) -> dict:
    import faiss

    prefilter = bf16.use_prefilter("auto", torch.device("cpu"), torch.float32, None, n_q, n_db, k)
    q = unit_gaussian(n_q, dim, 1)
    d = unit_gaussian(n_db, dim, 2)
    index = faiss.IndexFlatIP(dim)
    index.add(d)
    times: dict[str, list[float]] = {"faiss": [], "ours": [], "products": [], "bf16_products": []}
    res_f = res_o = None
    for _ in range(repeats):
        t = time.perf_counter()
        fv, fi = index.search(q, k)
        times["faiss"].append(time.perf_counter() - t)
        res_f = (fv, fi)
        t = time.perf_counter()
        res_o = search.topk(q, d, k)
        times["ours"].append(time.perf_counter() - t)
        t = time.perf_counter()
        products_only(q, d, k)
        times["products"].append(time.perf_counter() - t)
        if prefilter:
            t = time.perf_counter()
            products_only(q, d, k, torch.bfloat16)
            times["bf16_products"].append(time.perf_counter() - t)
    best = {name: min(v) if v else float("nan") for name, v in times.items()}
    return {
        "queries": n_q, "database": n_db, "dim": dim, "k": k,
        "faiss_s": best["faiss"], "ours_s": best["ours"], "products_s": best["products"],
        "bf16_products_s": best["bf16_products"], "prefilter": prefilter,
        "ratio_to_faiss": best["ours"] / best["faiss"], "all_runs": times,
        **agreement(q, d, res_o, res_f),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=10000)
    p.add_argument("--database", type=int, nargs="+", default=[100000, 1000000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    import faiss

    info = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
        f"faiss threads {faiss.omp_get_max_threads()}, load average at start {os.getloadavg()[0]:.1f}",
        "torch": torch.__version__, "faiss": faiss.__version__,
    }
    print(info["machine"])
    print("| queries x database | faiss IndexFlatIP | kernel.search.topk | ratio | float32 products | "
          "bfloat16 products | same ids | max score diff |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for n_db in args.database:
        r = run(args.queries, n_db, args.dim, args.k, args.repeats)
        rows.append(r)
        print(
            f"| {r['queries']:.0e} x {r['database']:.0e} | {r['faiss_s']:.2f} s | {r['ours_s']:.2f} s | "
            f"{r['ratio_to_faiss']:.2f}x | {r['products_s']:.2f} s | "
            + (f"{r['bf16_products_s']:.2f} s (prefilter on)" if r["prefilter"] else "- (prefilter off)")
            + f" | {100 * r['same_ids']:.4f} % "
            f"(rest near-ties: {r['differing_are_near_ties']}) | {r['max_score_diff']:.1e} |",
            flush=True,
        )
    info["load_average_end"] = os.getloadavg()[0]
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "results": rows}, indent=2))
    print(json.dumps({"info": info, "results": [{k: v for k, v in r.items() if k != "all_runs"} for r in rows]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
