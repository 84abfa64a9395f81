"""``python -m kernel.train smoke``: proof on a CPU (or ``--device cuda``), in minutes, that the training loop learns.

The 13 photographs bundled in ``kernel/demo/sample_data/gldv2`` become 13 classes: each photo gives several views
(random crops, flips, colour jitter, small rotations) written as JPEGs in the GLDv2 ``a/b/c`` folder layout with
a ``train.csv``, so the run goes through the same CSV reader, dataset, augmentation, loss, optimiser,
schedule, checkpoints and validation as a real one. Some views of every photo are held out; the mAP@100 of
held-out views retrieving each other is measured before and after training a tiny model of the ensemble's
families (the tiny demo preset: same code paths, tiny backbones). The last line printed is JSON with
``map_before`` and ``map_after`` (and GAP before/after, per family).
"""
from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from torchvision.transforms import v2

from kernel.demo import SAMPLE_DIR as SAMPLES
from kernel.errors import KernelError

log = logging.getLogger(__name__)

# family -> (tiny demo entry it trains, Adam learning rate); quick mode trains the first only. The Swin of the
# hybrid needs a 10x lower rate than the convolutional nets, as in the real recipes' transformer steps.
FAMILIES = {"effnet": ("effnet_b6_512", 1e-2), "dolg": ("dolg_effnet_b5_768", 1e-2),
            "hybrid": ("hybrid_b6_swin384_384", 1e-3)}


def make_views(out_dir: Path, views: int, view_size: int, seed: int = 0) -> pd.DataFrame:
    """Write ``views`` random views of every bundled photo as ``out_dir/a/b/c/<id>.jpg``; the photo's index is
    its ``landmark_id``. Returns the ``id,landmark_id`` frame (also written to ``out_dir/train.csv``)."""
    photos = sorted(SAMPLES.glob("*.jpg"))
    if not photos:
        raise KernelError(f"{SAMPLES}: the bundled sample photos are missing")
    torch.manual_seed(seed)
    view = v2.Compose([
        v2.RandomResizedCrop(view_size, scale=(0.25, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomRotation(8),
        v2.ColorJitter(0.35, 0.35, 0.35, 0.04),
    ])
    rows = []
    for lid, photo in enumerate(photos):
        with Image.open(photo) as im:
            im = im.convert("RGB")
            im.thumbnail((4 * view_size, 4 * view_size))
            base = v2.functional.pil_to_tensor(im)
        for k in range(views):
            image_id = hashlib.sha1(f"{photo.stem}/{k}/{seed}".encode()).hexdigest()[:16]
            path = out_dir / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(view(base).permute(1, 2, 0).numpy()).save(path, quality=92)
            rows.append((image_id, lid))
    df = pd.DataFrame(rows, columns=["id", "landmark_id"])
    df.to_csv(out_dir / "train.csv", index=False)
    return df


def smoke_step(entry: dict, image_size: int, epochs: int, batch_size: int, lr: float) -> dict:
    """A one-step recipe for the smoke run (the 2021 loss: sub-center ArcFace, dynamic margins)."""
    from kernel.train.recipes import STEP_DEFAULTS

    arch = dict(entry, image_size=image_size) if entry["family"] != "hybrid" else dict(entry)
    return {**STEP_DEFAULTS, "data": "gldv2", "image_size": arch["image_size"], "epochs": epochs, "lr": lr,
            "batch_size": batch_size, "init": "random", "source": "smoke", "warmup_epochs": 1, "gpus": 1,
            "warmup_start": 0.1, "weight_decay": 1e-4, "clip_grad": 5.0,
            "loss": {"type": "arcface", "s": 30.0, "margins": "dynamic", "a": 0.45, "b": 0.05, "k": 3},
            "arch": arch, "recipe": f"smoke_{entry['family']}", "step": 1, "n_steps": 1, "pretrained_tags": {}}


def run_smoke(quick: bool = False, out: str | Path | None = None, families=None, seed: int = 0,
              progress: bool = True, views: int | None = None, held: int | None = None, epochs: int | None = None,
              lr: float | None = None, image_size: int = 64, device: str = "cpu", precision: str = "auto") -> dict:
    """Generate the data, train on ``device`` (``precision`` as ``fit --precision``: fp32 on a CPU, bf16 or fp16
    on a GPU), and return ``{"map_before", "map_after", ...}`` (the first family's numbers at the top level,
    every family's under ``"families"``)."""
    from kernel.demo.weights import preset_entries
    from kernel.train.data import holdout, read_labels
    from kernel.train.fit import StepRun

    torch.set_num_threads(max(1, torch.get_num_threads()))
    d_views, d_held, d_epochs = (10, 3, 8) if quick else (16, 4, 16)
    views, held, epochs = views or d_views, held or d_held, epochs or d_epochs
    families = families or (["effnet"] if quick else list(FAMILIES))
    entries = {e["name"]: e for e in preset_entries("tiny")}
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="kernel-smoke-") as tmp:
        root = Path(out) if out else Path(tmp)
        data = root / "data"
        data.mkdir(parents=True, exist_ok=True)
        make_views(data, views, view_size=96, seed=seed)
        df = read_labels(data / "train.csv")
        train_df, val_df = holdout(df, held / views, min_images=2, seed=seed)
        results = {}
        for fam in families:
            if fam not in FAMILIES:
                raise KernelError(f"unknown family '{fam}' (choose from {', '.join(FAMILIES)})")
            name, fam_lr = FAMILIES[fam]
            step = smoke_step(entries[name], image_size=image_size, epochs=epochs, batch_size=16, lr=lr or fam_lr)
            run = StepRun(step, train_df, val_df, data, root / "runs" / fam, workers=0, seed=seed,
                          device=device, precision=precision, progress=progress)
            hist = run.run(validate_before=True)
            results[fam] = {"model": name, "map_before": hist[0]["map100"], "map_after": hist[-1]["map100"],
                            "gap_before": hist[0]["gap"], "gap_after": hist[-1]["gap"],
                            "train_loss_first": hist[1]["train_loss"], "train_loss_last": hist[-1]["train_loss"]}
            log.info("%s: mAP@100 %.3f -> %.3f", fam, results[fam]["map_before"], results[fam]["map_after"])
    first = results[families[0]]
    return {"map_before": first["map_before"], "map_after": first["map_after"], "family": families[0],
            "classes": int(df["landmark_id"].nunique()), "train_images": len(train_df), "val_images": len(val_df),
            "epochs": epochs, "seconds": round(time.time() - t0, 1), "device": device, "families": results}
