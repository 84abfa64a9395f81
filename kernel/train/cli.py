"""``python -m kernel.train fit | clean | cost | smoke``.

Bad input ends with one line ``error: ...`` naming the file or field (exit 2), never a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging

from kernel.errors import KernelError

log = logging.getLogger(__name__)


def _parse_set(items) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise KernelError(f"--set {item!r}: expected KEY=VALUE (VALUE in JSON, e.g. batch_size=8)")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except ValueError:
            out[k.strip()] = v
    return out


def add_fit(p) -> None:
    from kernel.cli import add_trust_argument

    add_trust_argument(p)  # --init may name an original checkpoint that pickled more than tensors
    p.add_argument("--recipe", required=True, help="recipe name (see kernel/train/recipes.py)")
    p.add_argument("--step", type=int, required=True, help="1-based step of the recipe")
    p.add_argument("--data", required=True, help="GLDv2 folder: train/a/b/c/<id>.jpg plus the label CSVs")
    p.add_argument("--out", required=True, help="run folder; the step writes OUT/step<K>/")
    p.add_argument("--resume", action="store_true", help="continue from OUT/step<K>/last.pth when it exists")
    p.add_argument("--init", default=None, help="checkpoint to start from instead of OUT/step<init>/model.pth")
    p.add_argument("--images", default=None, help="image folder (default DATA/train)")
    p.add_argument("--train-csv", default=None, help="label CSV instead of the step's named data set")
    p.add_argument("--manifest", default=None, help="weights_manifest.json with the architecture (default: the repo's)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a step field (repeatable)")
    p.add_argument("--val-fraction", type=float, default=0.02,
                   help="hold out floor(F x n) images of every class of n images for validation (classes under "
                        "1/F images keep all theirs; margins still count the whole list); 0: train on all")
    p.add_argument("--val-csv", default=None,
                   help="validate on these labelled images instead of a held-out part: id,landmark_id, or the "
                        "2019 test set's id,landmarks,Usage (recognition_solution_v2.1.csv, as the 2021 configs)")
    p.add_argument("--val-images", default=None, help="image folder of --val-csv (default: --images)")
    p.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="synchronised BatchNorm across GPUs (default: the recipe's sync_bn)")
    p.add_argument("--scale-lr", action="store_true",
                   help="on another GPU count than the recipe's, scale lr linearly with the images per step")
    p.add_argument("--dist-timeout", type=float, default=None, metavar="MIN",
                   help="minutes a rank may wait at a collective (default 120; PyTorch's own is 10)")
    p.add_argument("--random-init", action="store_true",
                   help="allow parts the original starts pretrained to start from random weights")
    p.add_argument("--val-before", action="store_true", help="validate once before training")
    p.add_argument("--imagenet", action="store_true",
                   help="load timm ImageNet weights first (timm's local cache, nothing is downloaded); needed by "
                        "every step whose pretrained parts the previous step does not hold")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    p.add_argument("--workers", type=int, default=8, help="data-loading processes per GPU")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--seed", type=int, default=0)


def run_fit(args) -> int:
    from pathlib import Path

    from kernel.train.data import holdout, load_named, read_labels, read_val_labels
    from kernel.train.fit import StepRun
    from kernel.train.recipes import resolve_step

    entries = None
    if args.manifest:
        from kernel.models import load_manifest

        entries = load_manifest(args.manifest)
    step = resolve_step(args.recipe, args.step, entries, _parse_set(args.set))
    df = read_labels(args.train_csv) if args.train_csv else load_named(args.data, step["data"])
    if args.val_csv:
        train_df, val_df = df, read_val_labels(args.val_csv)
    else:
        train_df, val_df = holdout(df, args.val_fraction, seed=args.seed)
    out = Path(args.out) / f"step{args.step}"
    run = StepRun(step, train_df, val_df, args.images or Path(args.data) / "train", out, init_path=args.init,
                  resume=args.resume, device=args.device, workers=args.workers, imagenet=args.imagenet,
                  precision=args.precision, seed=args.seed, val_root=args.val_images, sync_bn=args.sync_bn,
                  random_init=args.random_init, margin_labels=df["landmark_id"], scale_lr=args.scale_lr,
                  dist_timeout_min=args.dist_timeout)
    hist = run.run(validate_before=args.val_before)
    if run.env.main and hist:
        print(json.dumps({"model": str(out / "model.pth"), **hist[-1]}))
    return 0


def add_clean(p) -> None:
    p.add_argument("--store", required=True, help="descriptor store with the GLDv2 train descriptors")
    p.add_argument("--model", default=None, help="model whose descriptors to use (default: the store's only one)")
    p.add_argument("--split", default="train", help="store split holding the images of --train-csv")
    p.add_argument("--train-csv", required=True, help="labels to clean (id,landmark_id or landmark_id,images)")
    p.add_argument("--out", required=True, help="cleaned CSV to write (report: OUT.report.json beside it)")
    p.add_argument("--eps", type=float, default=0.4, help="DBSCAN cosine distance of the first pass")
    p.add_argument("--min-samples", type=int, default=3)
    p.add_argument("--recover-eps", type=float, default=0.55, help="looser distance re-clustering the noise")
    p.add_argument("--recover-min-samples", type=int, default=2)


def run_clean(args) -> int:
    from kernel.train.clean import run_clean as clean

    report = clean(args.store, args.model, args.split, args.train_csv, args.out, eps=args.eps,
                   min_samples=args.min_samples, recover_eps=args.recover_eps,
                   recover_min_samples=args.recover_min_samples)
    print(json.dumps(report))
    return 0


def add_smoke(p) -> None:
    p.add_argument("--quick", action="store_true", help="one family, fewer views and epochs (CI: well under a minute)")
    p.add_argument("--families", default=None, help="comma-separated subset of effnet,dolg,hybrid")
    p.add_argument("--out", default=None, help="keep the generated data and runs here (default: a temp folder)")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="as fit's: auto is fp32 on a CPU, bf16 (else fp16) on a GPU")


def run_smoke(args) -> int:
    from kernel.train.smoke import run_smoke as smoke

    fams = [f.strip() for f in args.families.split(",")] if args.families else None
    res = smoke(quick=args.quick, out=args.out, families=fams, seed=args.seed, progress=not args.json,
                device=args.device, precision=args.precision)
    if not args.json:
        for fam, r in res["families"].items():
            print(f"{fam:7s} ({r['model']}): mAP@100 {r['map_before']:.3f} -> {r['map_after']:.3f}, "
                  f"GAP {r['gap_before']:.3f} -> {r['gap_after']:.3f}")
    print(json.dumps(res))
    return 0


def add_cost(p) -> None:
    p.add_argument("--recipe", action="append", default=None, help="recipe (repeatable; default: all)")
    p.add_argument("--gpu", default="A100", help="GPU of the projection (kernel/budget.py GPU_FP16_TFLOPS)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs of the job (wall-clock days = GPU-hours / gpus / 24)")
    p.add_argument("--data", default=None, help="GLDv2 folder: count the data sets' images from its CSVs")
    p.add_argument("--json", action="store_true", help="print only JSON")


def run_cost(args) -> int:
    from kernel.train.cost import count_images, recipe_costs

    rows = recipe_costs(args.recipe, gpu=args.gpu, images=count_images(args.data) if args.data else None)
    if not args.json:
        print(f"PROJECTED (not measured) training cost on {args.gpu} GPUs: 3 x forward FLOPs per image, "
              "kernel/budget.py efficiencies, data loading and validation not counted")
        total: dict[str, float] = {}
        for r in rows:
            total[r["recipe"]] = total.get(r["recipe"], 0.0) + r["gpu_hours"]
            print(f"  {r['recipe']:26s} step {r['step']}: {r['data']:15s} {r['images']:>9,d} images x "
                  f"{r['epochs']:2d} epochs at {r['image_size']:3d} px, {r['gflop']:6.1f} GFLOP -> "
                  f"{r['gpu_hours']:7.1f} GPU-h")
        for name, h in total.items():
            print(f"{name:28s} {h:7.0f} GPU-h = {h / args.gpus / 24:5.1f} days on {args.gpus} GPUs")
    print(json.dumps(rows))
    return 0


COMMANDS = {
    "fit": ("train one recipe step (torchrun for several GPUs)", add_fit, run_fit),
    "clean": ("DBSCAN cleaning of the training labels on descriptors", add_clean, run_clean),
    "cost": ("projected GPU-hours of every recipe step (epochs x images x FLOPs)", add_cost, run_cost),
    "smoke": ("tiny CPU training run on the bundled photos; prints map_before / map_after", add_smoke, run_smoke),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kernel.train",
                                     description="Training code that reproduces the kernel's checkpoints.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_, add, _) in COMMANDS.items():
        add(sub.add_parser(name, help=help_, description=help_))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from kernel.cli import run_command

    return run_command(COMMANDS[args.command][2], args, verbose=args.verbose, quiet=getattr(args, "json", False))
