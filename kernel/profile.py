"""``python -m kernel profile``: per-model cost on this device, projected cost on each Kaggle accelerator, and
the 12-hour plan for each.

For every model: measured ms/image on this device at its real image size and best batch size, GFLOP/image
(torch's flop counter), projected ms/image on one device of each card of :data:`kernel.budget.TARGETS` (the T4 x2
Kaggle gives today, the retired P100; :mod:`kernel.budget` documents the model), then the projected hours of the
whole run for the given image counts against the budget and the plan of which models fit on each card
(``--target`` picks the cards printed; the JSON always holds every card). Optionally writes a bar chart as PNG.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from kernel import budget, sizes
from kernel.devices import resolve_device
from kernel.errors import KernelError

log = logging.getLogger(__name__)

HELP = "measure each model on this device, project its time on Kaggle's T4 x2 and P100, plan what fits 12 h"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


#: seconds of forwards before a GPU timing: an idle GPU clocks down (an H200 idles at a sixth of its clock) and
#: takes a while to ramp up; one warm-up forward left the first model of a profile 3x slow there
WARM_SECONDS = 0.5


def _warm_up(model, x, device: torch.device) -> None:
    """At least one forward; on a GPU, forwards until :data:`WARM_SECONDS` have passed (clock ramp, cuDNN's
    choice of kernels for this shape, lazy loading)."""
    t_end = time.perf_counter() + (WARM_SECONDS if device.type == "cuda" else 0.0)
    while True:
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if time.perf_counter() >= t_end:
            return


def time_model(model, size: int, device: torch.device, batch_sizes, iters: int) -> tuple[float, int]:
    """Best (ms per image, batch size) over the candidate batch sizes; stops growing the batch on OOM or
    when throughput stops improving."""
    best = (float("inf"), batch_sizes[0])
    amp = device.type == "cuda"
    for bs in batch_sizes:
        x = torch.randn(bs, 3, size, size, device=device)
        if amp:
            x = x.contiguous(memory_format=torch.channels_last)
        try:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                _warm_up(model, x, device)
                t0 = time.perf_counter()
                for _ in range(iters):
                    model(x)
                if amp:
                    torch.cuda.synchronize(device)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
        ms = (time.perf_counter() - t0) * 1000 / (iters * bs)
        if ms < best[0]:
            best = (ms, bs)
        elif ms > best[0] * 0.97:
            break
    return best


def profile_models(entries, weights=None, device=None, batch_sizes=None, iters=None, efficiency=None,
                   measure=True) -> list[dict]:
    """One row per model: GFLOP, ``<card>_ms`` projected for every card, and the measurement here."""
    from kernel.models import build_model, load_model

    device = resolve_device(device)
    if batch_sizes is None:
        batch_sizes = [1, 2, 4, 8, 16, 32, 64] if device.type == "cuda" else [1, 2]
    iters = iters or (5 if device.type == "cuda" else 1)
    rows = []
    for e in entries:
        gflop = budget.count_gflops(e)
        row = {"name": e["name"], "family": e["family"], "image_size": e["image_size"], "priority": e["priority"],
               "tracks": e["tracks"], "gflop": round(gflop, 3)}
        for key, tgt in budget.TARGETS.items():
            row[f"{key}_ms"] = round(budget.projected_ms(gflop, e["family"], tgt, efficiency), 3)
        if measure:
            model = load_model(e, weights, device) if weights else build_model(e).eval().to(device)
            if device.type == "cuda":
                model = model.to(memory_format=torch.channels_last)
            ms, bs = time_model(model, e["image_size"], device, batch_sizes, iters)
            row.update(measured_ms=round(ms, 2), batch_size=bs)
            eff = budget.measured_efficiency(gflop, ms, device_name(device)) if device.type == "cuda" else None
            if eff is not None:
                row["measured_efficiency"] = round(eff, 3)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        log.info("%s: %s", e["name"], row)
        rows.append(row)
    return rows


def images_per_model(entry: dict, track: str, n_test: int, n_index: int, n_train: int) -> int:
    n = n_test + n_train
    if track == "retrieval":
        n += n_index
    return n


DECODE_CORES = 2  # our reading: the 2 CPU cores of Kaggle's P100 sessions (docs/kaggle.md#the-notebooks-machine-2021-and-today); assumed for the T4 x2 too


def make_plan(rows, entries, track, n_test, n_index, n_train, budget_hours, decode_ms, reserve_hours,
              target="t4x2"):
    """The plan of ``track`` on card ``target``; writes ``<target>_<track>_hours`` into the rows."""
    by = {e["name"]: e for e in entries}
    devices = budget.TARGETS[target]["devices"]
    chosen = [r for r in rows if track in by[r["name"]]["tracks"]]
    costs, priority = {}, {}
    for r in chosen:
        n = images_per_model(by[r["name"]], track, n_test, n_index, n_train)
        costs[r["name"]] = n * r[f"{target}_ms"] / 1000 / devices  # the devices share the images
        priority[r["name"]] = r["priority"]
        r[f"{target}_{track}_hours"] = round(costs[r["name"]] / 3600, 3)
    n_images = n_test + n_train + (n_index if track == "retrieval" else 0)
    fixed = n_images * decode_ms / 1000 / DECODE_CORES + reserve_hours * 3600
    plan = budget.plan_models(costs, priority, budget_hours * 3600, fixed_s=fixed)
    out = plan.as_dict()
    out.update(track=track, target=target, images=n_images, fixed_hours=round(fixed / 3600, 3))
    return out


def _card_line(key: str, efficiency) -> str:
    t = budget.TARGETS[key]
    eff = budget.target_efficiency(t, efficiency)
    return (f"{key}: {t['name']}: {t['devices']} x {t['fp16_tflops']} TFLOPS fp16, {t['mem_gbs']:.0f} GB/s; "
            f"efficiency {', '.join(f'{k} {v:.3f}' for k, v in eff.items())}")


def format_table(rows, plans, device_label, efficiency=None) -> str:
    targets = list(dict.fromkeys(p["target"] for p in plans))
    tracks = list(dict.fromkeys(p["track"] for p in plans))
    head = f"{'model':<26}{'size':>5}{'GFLOP':>8}{'here ms':>10}{'bs':>4}"
    head += "".join(f"{k + ' ms':>9}" for k in targets)
    head += "".join(f"{k + ' ' + t[:5] + ' h':>14}" for k in targets for t in tracks)
    lines = [f"device: {device_label}; projection per device: GFLOP / (fp16 peak x family efficiency)"]
    lines += [_card_line(k, efficiency) for k in targets]
    lines += [head, "-" * len(head)]
    for r in rows:
        here = f"{r['measured_ms']:>10.1f}{r['batch_size']:>4}" if "measured_ms" in r else f"{'-':>10}{'-':>4}"
        line = f"{r['name']:<26}{r['image_size']:>5}{r['gflop']:>8.1f}{here}"
        line += "".join(f"{r[f'{k}_ms']:>9.1f}" for k in targets)
        for k in targets:
            for t in tracks:
                v = r.get(f"{k}_{t}_hours")
                line += f"{v:>14.2f}" if v is not None else f"{'-':>14}"
        lines.append(line)
    for p in plans:
        lines.append("")
        lines.append(f"{p['target']} {p['track']}: {p['images']} images per model; projected "
                     f"{p['projected_hours']:.2f} h of {p['budget_hours']:.1f} h (incl. {p['fixed_hours']:.2f} h "
                     f"decode + reserve) -> {'fits' if p['fits'] else 'DOES NOT FIT'}")
        lines.append(f"  keep: {', '.join(p['kept'])}")
        if p["dropped"]:
            lines.append(f"  drop: {', '.join(p['dropped'])}")
        lines.extend(f"  - {d}" for d in p["decisions"])
    return "\n".join(lines)


PLOT_DPI = 100
PLOT_COLOURS = {"recognition": "#3465a4", "retrieval": "#cc6600"}


def plot_size(n_models: int, n_tracks: int) -> tuple[float, float]:
    """Size of the bar chart in inches (``PLOT_DPI`` pixels each): 9 wide, one bar row per model and track."""
    return 9.0, 2.0 + 0.3 * n_models * max(1, n_tracks)


def plot(rows, plans, path: Path, title: str) -> None:
    """Horizontal bar chart (matplotlib, Agg): projected hours per model per track on the plans' card, one
    legend entry per track with the plan's total."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tracks, key = [p["track"] for p in plans], plans[0]["target"]
    fig = Figure(figsize=plot_size(len(rows), len(tracks)), dpi=PLOT_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    height = 0.8 / max(1, len(tracks))
    for j, p in enumerate(plans):
        t = p["track"]
        ys = [i + (j - (len(tracks) - 1) / 2) * height for i in range(len(rows))]
        hours = [r.get(f"{key}_{t}_hours") for r in rows]
        bars = ax.barh([y for y, v in zip(ys, hours) if v is not None], [v for v in hours if v is not None],
                       height=height, color=PLOT_COLOURS.get(t, "grey"),
                       label=f"{t}: total {p['projected_hours']:.2f} h of {p['budget_hours']:.0f} h, keeps "
                             f"{len(p['kept'])}/{len(p['kept']) + len(p['dropped'])} models")
        ax.bar_label(bars, labels=[f"{v:.2f} h" for v in hours if v is not None], padding=3, fontsize=7)
    ax.set_yticks(range(len(rows)), [f"{r['name']} ({r['gflop']:.0f} GFLOP)" for r in rows], fontsize=8)
    ax.invert_yaxis()  # the first model at the top
    ax.set_xlabel(f"projected hours on {key}")
    ax.set_ylabel("model")
    ax.set_title(title, fontsize=10)
    ax.margins(x=0.15)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def add_arguments(p) -> None:
    from kernel.cli import number
    from kernel.demo.weights import REPO_MANIFEST

    p.add_argument("--manifest", default=str(REPO_MANIFEST), help="weights manifest (default: the repo's nine models)")
    p.add_argument("--weights", default=None, help="checkpoint folder (optional: timings do not depend on weights)")
    p.add_argument("--models", default=None, help="comma-separated subset")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--track", choices=["recognition", "retrieval", "both"], default="both")
    p.add_argument("--n-test", type=number(int, 0), default=None,
                   help="test images of both tracks (default: the scored rerun's hidden test sets, our reading: "
                   f"{sizes.HIDDEN_FACTOR}x the public 10,000 (recognition) and 1,129 (retrieval), kernel/sizes.py)")
    p.add_argument("--n-index", type=number(int, 0), default=None,
                   help="retrieval index images extracted in the notebook (default: the hidden index's images beyond "
                   "the public 76,176, whose descriptors are shipped; our reading: the hidden index is "
                   f"{sizes.HIDDEN_FACTOR}x the public one)")
    p.add_argument("--n-train", type=number(int, 0), default=0,
                   help="train images extracted in the kernel (default 0: train descriptors are precomputed)")
    p.add_argument("--target", choices=[*budget.TARGETS, "all"], default="all",
                   help="card whose plan is printed: t4x2 (Kaggle today), p100 (retired), all (default); "
                   "the JSON holds every card")
    p.add_argument("--budget-hours", type=number(float, 0, exclusive_min=True), default=12.0)
    p.add_argument("--reserve-hours", type=number(float, 0), default=0.5, help="reserved for loading and post-processing")
    p.add_argument("--decode-ms", type=number(float, 0), default=12.0, help="CPU decode+resize ms per image and core")
    p.add_argument("--efficiency", action="append", default=[], metavar="[CARD:]FAMILY=VALUE",
                   help="override a family's assumed fraction of the P100's fp16 peak (the basis of every card), "
                   "or with CARD: (t4x2:effnet=0.03) of that card's own peak (repeatable)")
    p.add_argument("--batch-sizes", default=None, help="comma-separated candidate batch sizes")
    p.add_argument("--iters", type=number(int, 1), default=None, help="timed iterations per batch size")
    p.add_argument("--no-measure", action="store_true", help="FLOPs and projection only, no timing here")
    p.add_argument("--json", default=None, help="write the results as JSON here")
    p.add_argument("--plot", default=None, help="write a bar chart PNG here")


def parse_efficiency(items) -> dict:
    """``[CARD:]FAMILY=VALUE`` items of ``--efficiency`` -> ``{"family" or "card:family": value}``."""
    out = {}
    for item in items:
        key, _, val = item.partition("=")
        card, _, fam = key.rpartition(":")
        if fam not in budget.DEFAULT_EFFICIENCY or (card and card not in budget.TARGETS):
            raise KernelError(f"--efficiency {item}: expected [CARD:]FAMILY=VALUE with CARD one of "
                              f"{', '.join(budget.TARGETS)} and FAMILY one of {', '.join(budget.DEFAULT_EFFICIENCY)}")
        try:
            out[key] = float(val)
        except ValueError:
            raise KernelError(f"--efficiency {item}: '{val}' is not a number") from None
        if not 0 < out[key] <= 1:
            raise KernelError(f"--efficiency {item}: a fraction of peak must be in (0, 1]")
    return out


def track_counts(track: str, n_test: int | None, n_index: int | None, n_train: int) -> dict:
    """The images a plan of ``track`` counts: the given ones, else the scored rerun's (:func:`kernel.sizes.hidden_counts`)."""
    hidden = sizes.hidden_counts(track)
    return {"test": hidden["test"] if n_test is None else n_test,
            "index": (hidden["index"] if n_index is None else n_index) if track == "retrieval" else 0,
            "train": n_train}


def counts_line(track: str, counts: dict, args) -> str:
    """What the plan of ``track`` is for: the hidden sets by default (against what the public folder holds), or
    the counts given on the command line."""
    if args.n_test is None and (track != "retrieval" or args.n_index is None):
        return sizes.sizes_line(track, counts)
    public = sizes.PUBLIC[track]
    index = f" and {counts['index']:,} index images extracted in the notebook" if track == "retrieval" else ""
    return f"{track}: planned for {counts['test']:,} test images{index} as given (public test/: {public['test']:,})"


def run(args) -> int:
    from kernel.cli import output_file
    from kernel.models import load_manifest, select

    entries = select(load_manifest(args.manifest), args.models)
    efficiency = parse_efficiency(args.efficiency)
    for option in ("json", "plot"):
        if getattr(args, option):
            output_file(getattr(args, option), f"--{option}", inputs=[args.manifest, args.weights])
    device = resolve_device(args.device)
    try:
        bss = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else None
    except ValueError:
        raise KernelError(f"--batch-sizes {args.batch_sizes}: expected comma-separated integers") from None
    if bss is not None and (not bss or min(bss) < 1):
        raise KernelError(f"--batch-sizes {args.batch_sizes}: batch sizes must be >= 1")
    rows = profile_models(entries, args.weights, str(device), bss, args.iters, efficiency,
                          measure=not args.no_measure)
    tracks = ["recognition", "retrieval"] if args.track == "both" else [args.track]
    counts = {t: track_counts(t, args.n_test, args.n_index, args.n_train) for t in tracks}
    plans = {k: [make_plan(rows, entries, t, counts[t]["test"], counts[t]["index"], args.n_train, args.budget_hours,
                           args.decode_ms, args.reserve_hours, target=k) for t in tracks] for k in budget.TARGETS}
    shown = list(budget.TARGETS) if args.target == "all" else [args.target]
    label = device_name(device)
    print("\n".join(counts_line(t, counts[t], args) for t in tracks))
    print(format_table(rows, [p for k in shown for p in plans[k]], label, efficiency))
    result = {"device": label, "efficiency": efficiency, "decode_cores": DECODE_CORES, "counts": counts,
              "public": {t: sizes.PUBLIC[t] for t in tracks}, "hidden_factor": sizes.HIDDEN_FACTOR,
              "targets": {k: {**t, "efficiency": budget.target_efficiency(t, efficiency),
                              "plans": {p["track"]: p for p in plans[k]}} for k, t in budget.TARGETS.items()},
              "models": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"\nJSON: {args.json}")
    if args.plot:
        plot(rows, plans[shown[0]], Path(args.plot), f"Projected {shown[0]} hours per model ({label})")
        print(f"plot: {args.plot}")
    return 0
