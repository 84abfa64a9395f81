"""Post-processing at competition scale: peak memory and time against the train size.

    python -m benchmarks.bench_scale --sizes 100000 400000 1580470 --root /tmp/scale \\
        --json benchmarks/results/scale.json --plot benchmarks/results/scale.png

For every train size, a synthetic store of the real format (``python -m kernel rehearse``: float16 .npz,
512-d, eight models, a non-landmark bank) is written under ``--root`` (kept, and reused by a later run of
the same sizes), then ``python -m kernel postprocess`` runs in a child process for each track with
``--memory-gb`` and no prepared artefacts (everything computed): recognition with every model, retrieval
(soft) with ``--retrieval-models``. Reported per run: wall time, peak resident memory of the child
(its own high-water mark, ``kernel.memory.peak_rss_gib``; ``getrusage`` through ``wait4`` is kept beside it), and
the ratio of the time to its matrix-product floor.

The floor is the run's similarity products alone, in the blocks and dtype :func:`kernel.search.topk` uses
(``bench_postprocess.floor``), timed in this process right after the run on a sample of
``--floor-sample`` database rows and scaled linearly to the full train size (products are linear in the
database rows); recognition: queries x train (1536-d, scored: float32), train x bank, queries x bank;
retrieval, per model: (queries + index) x train and queries x index (512-d).

The plot shows peak memory and time against the train size, with the in-memory implementation's measured
peaks (before streaming: 3.1 GiB at 100 k and 10.0 GiB at 400 k train images, recognition, 10,000 test
images; issue 11) for comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from benchmarks.bench_postprocess import centres, clustered, floor
from kernel import rehearse
from kernel.postprocess import recognition as rec, retrieval as ret

#: peaks of the in-memory implementation this replaced (recognition, 8 models, 10,000 test, 2,000 bank)
IN_MEMORY_PEAK_GIB = {100_000: 3.1, 400_000: 10.0}


def floor_seconds(track: str, n_train: int, sizes: dict, n_models: int, sample: int) -> float:
    """The run's products alone (see module docstring), on ``sample`` train rows, scaled to ``n_train``."""
    s = min(sample, n_train)
    q_n, i_n, b_n = sizes["test"], sizes["index"], sizes["nonlandmark"]
    recognition = track == "recognition"
    c = centres(2000, 1536 if recognition else 512, 0)
    q, _ = clustered(q_n, c, 1.2, 1)
    t, _ = clustered(s, c, 1.2, 2)
    o, _ = clustered(b_n if recognition else i_n, c, 1.2, 3)  # the bank, or the index
    if recognition:
        scaled = [(q, t, rec.KNN_K, True), (t, o, rec.BANK_K_TRAIN, False)]
        fixed = [(q, o, rec.BANK_K_QUERY, False)]
    else:
        scaled = [(q, t, ret.KNN_K, False), (o, t, ret.KNN_K, False)]
        fixed = [(q, o, ret.SOFT_KEEP, True)]
    t0 = time.perf_counter()
    floor(scaled)
    t_scaled = time.perf_counter() - t0
    t0 = time.perf_counter()
    floor(fixed)
    t_fixed = time.perf_counter() - t0
    per_model = t_scaled * n_train / s + t_fixed
    return per_model * (n_models if track == "retrieval" else 1)


def run_size(root: Path, n_train: int, args) -> list[dict]:
    out = root / f"train{n_train}"
    ns = argparse.Namespace(train=n_train, index=args.index, test=args.test, bank=args.bank, models=args.models)
    desc = rehearse._ensure_store(out, ns)
    retrieval_models = rehearse.retrieval_models_of(out / "store", args.retrieval_models)
    rows = []
    for track in args.tracks:
        cmd = ["postprocess", "--track", track, "--store", str(out / "store"), "--train-labels",
               str(out / "train.csv"), "--out", str(out / f"{track}_submission.csv"), "--memory-gb",
               str(args.memory_gb), "--no-progress", "--prepared", str(out / "no-prepared")]
        if track == "retrieval":
            cmd += ["--models", ",".join(retrieval_models)]
        r = rehearse.run_child(cmd, out / f"{track}.log")
        n_models = len(retrieval_models) if track == "retrieval" else args.models
        r["floor_s"] = floor_seconds(track, n_train, desc["sizes"], n_models, args.floor_sample)
        r.update(track=track, train=n_train, models=n_models, ratio=r["seconds"] / r["floor_s"],
                 load_average=os.getloadavg()[0])
        rows.append(r)
        print(f"| {track} | {n_train:,} | {n_models} | {r['peak_rss_gib']:.2f} GiB | {r['seconds']:.0f} s | "
              f"{r['floor_s']:.0f} s | {r['ratio']:.2f}x | {'ok' if r['returncode'] == 0 else 'FAILED'} |", flush=True)
    return rows


def plot(rows: list[dict], path: Path, memory_gb: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
    for track, marker in (("recognition", "o"), ("retrieval", "s")):
        rs = sorted((r for r in rows if r["track"] == track), key=lambda r: r["train"])
        if not rs:
            continue
        x = [r["train"] / 1e6 for r in rs]
        ax_m.plot(x, [r["peak_rss_gib"] for r in rs], marker=marker, label=f"{track} ({rs[0]['models']} models), streamed")
        ax_t.plot(x, [r["seconds"] for r in rs], marker=marker, label=f"{track}: full post-processing")
        ax_t.plot(x, [r["floor_s"] for r in rs], marker=marker, linestyle="--", label=f"{track}: its products alone")
    ax_m.plot([n / 1e6 for n in IN_MEMORY_PEAK_GIB], list(IN_MEMORY_PEAK_GIB.values()), "x:", color="grey",
              label="recognition, before (in memory)")
    ax_m.axhline(memory_gb, color="red", linewidth=1, label=f"budget {memory_gb:g} GiB")
    ax_m.set(xlabel="train images (millions)", ylabel="peak resident memory (GiB)", title="Peak memory")
    ax_t.set(xlabel="train images (millions)", ylabel="seconds (this machine)", title="Time")
    for ax in (ax_m, ax_t):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 400_000, 1_580_470])
    p.add_argument("--root", default="/tmp/bench_scale", help="where the synthetic stores are written (kept)")
    p.add_argument("--index", type=int, default=20_000)
    p.add_argument("--test", type=int, default=5_000)
    p.add_argument("--bank", type=int, default=2_000)
    p.add_argument("--models", type=int, default=8)
    p.add_argument("--retrieval-models", type=int, default=2)
    p.add_argument("--tracks", nargs="+", default=["recognition", "retrieval"])
    p.add_argument("--memory-gb", type=float, default=10.0)
    p.add_argument("--floor-sample", type=int, default=131_072)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    args = p.parse_args()
    machine = f"{platform.machine()} {os.cpu_count()} cores, load average at start {os.getloadavg()[0]:.1f}"
    print(machine)
    print("| track | train | models | peak RSS | time | products alone | ratio | |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for n in args.sizes:
        rows += run_size(Path(args.root), n, args)
    out = {"machine": machine, "args": vars(args), "results": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    if args.plot:
        plot(rows, Path(args.plot), args.memory_gb)
    return 0 if all(r["returncode"] == 0 and r["peak_rss_gib"] <= args.memory_gb for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
