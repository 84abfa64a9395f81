"""The training loop of one recipe step.

Mixed precision (bf16 where the GPU has it, else fp16 with a grad scaler; fp32 on CPU), distributed data
parallel when started by ``torchrun`` (:mod:`kernel.train.distributed`), Adam (or SGD), the
recipes' schedules (per-iteration cosine / poly with linear warm-up, or the 2020 code's per-epoch one),
gradient accumulation and optional clipping, a NaN guard that skips a step on every rank together and stops
after too many in a row, a progress bar, per-epoch validation sharded over the ranks (GAP and mAP@100 of
held-out images, with the project's own metrics: :mod:`kernel.train.validation`), a warning when the GPU
count differs from the recipe's, a refusal to start when tensors the original starts pretrained get no
weights, and after every epoch an atomically written ``model.pth`` (original layout, loadable by
:func:`kernel.models.load_weights`) and ``last.pth`` (resumable).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from kernel.errors import KernelError
from kernel.train import checkpoint as ckpt
from kernel.train.augment import eval_transform, train_transform
from kernel.train.cutmix import corner_cutmix, dual_stream_loss
from kernel.train.data import ClassMap, DistributedWeightedSampler, LandmarkDataset, class_weights
from kernel.train.losses import build_loss
from kernel.train.nets import (attach_head, build_net, describe_missing, freeze, load_imagenet,
                               pretrained_tensors)
from kernel.train.distributed import DIST_TIMEOUT_MIN, _all_finite, setup_distributed, wrap_trainee
from kernel.train.validation import embed_sharded, validation_metrics

log = logging.getLogger(__name__)

MAX_BAD_STEPS = 50  # consecutive non-finite losses / gradients before the run is stopped
def check_gpu_count(step: dict, world: int, scale_lr: bool = False, warn: bool = True) -> float:
    """The learning rate to train with. The recipe's ``lr`` belongs to ``gpus x batch_size x grad_accum``
    images per optimiser step; on another GPU count each step averages over another number of images with the
    same lr. Warns (saying so, and what the linear scaling rule would give); ``scale_lr`` applies that rule
    (our reading: no source changed its GPU count, so neither choice is theirs)."""
    per_gpu = step["batch_size"] * step["grad_accum"]
    theirs, ours = step["gpus"] * per_gpu, world * per_gpu
    if theirs == ours:
        return step["lr"]
    scaled = step["lr"] * ours / theirs
    if warn:
        log.warning(
            "%s step %d: the recipe ran on %d GPUs (%d images per optimiser step), this run on %d (%d images): "
            "%s. Keeping the sum over GPUs equal needs --set batch_size=%s or grad_accum=%s.",
            step["recipe"], step["step"], step["gpus"], theirs, world, ours,
            f"lr scaled linearly to {scaled:.3g} (--scale-lr)" if scale_lr else
            f"the same lr {step['lr']:.3g} now averages over {ours / theirs:.3g}x the images per step "
            f"(linear scaling would give {scaled:.3g}: --scale-lr)",
            f"{theirs // world}" if theirs % world == 0 else "-", f"{theirs // (world * step['batch_size'])}"
            if theirs % (world * step["batch_size"]) == 0 else "-")
    return scaled if scale_lr else step["lr"]


def margin_counts(class_map: ClassMap, classes: np.ndarray, margin_labels=None) -> np.ndarray:
    """Per-class image counts the dynamic margins use: of ``margin_labels`` (the whole list, as both original
    codes counted them) when given, else of the training classes."""
    if margin_labels is None:
        return np.bincount(classes, minlength=len(class_map))
    ids = pd.Series(np.asarray(margin_labels)).map(class_map.index).dropna().astype(np.int64)
    counts = np.bincount(ids.to_numpy(), minlength=len(class_map))
    return np.maximum(counts, np.bincount(classes, minlength=len(class_map)))


def autocast_dtype(precision: str, device: torch.device):
    """``auto``: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU. Returns a dtype or None (fp32)."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def lr_factor(it: int, step: dict, iters_per_epoch: int) -> float:
    """LR multiplier at optimiser step ``it``.

    ``cosine`` / ``poly`` (per iteration): linear warm-up from ``warmup_start`` to 1 over ``warmup_epochs``,
    then cosine (to 0) or poly (power 0.9) decay over the rest of ``epochs``.
    ``cosine_2020``: the 2020 recognition code's schedule, stepped once per epoch (constant within an epoch):
    ``GradualWarmupSchedulerV2(multiplier=1/warmup_start, total_epoch=1)`` then
    ``CosineAnnealingWarmRestarts(T_0=epochs - 1)``, called as ``step(epoch - 1)`` at each epoch's start. For
    1-based epoch e that is ``warmup_start`` at e = 1, 1 at e = 2 and e = 3 (the after-scheduler's first value
    is its start), then ``(1 + cos(pi (e - 2) / (epochs - 1))) / 2``.
    """
    if step["schedule"] == "cosine_2020":
        e = it // max(iters_per_epoch, 1) + 1
        if e == 1:
            return step["warmup_start"]
        period = max(step["epochs"] - 1, 1)
        t = (e - 2 if e > 3 else 0) % period  # the after-scheduler restarts after T_0 epochs
        return 0.5 * (1 + math.cos(math.pi * t / period))
    warm = int(step["warmup_epochs"] * iters_per_epoch)
    total = max(step["epochs"] * iters_per_epoch, warm + 1)
    if it < warm:
        return step["warmup_start"] + (1 - step["warmup_start"]) * it / warm
    t = min((it - warm) / (total - warm), 1.0)
    if step["schedule"] == "poly":
        return (1 - t) ** 0.9
    return 0.5 * (1 + math.cos(math.pi * t))


def build_optimizer(params, step: dict) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if step["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=step["lr"], momentum=0.9, nesterov=True, weight_decay=step["weight_decay"])
    cls = torch.optim.AdamW if step["optimizer"] == "adamw" else torch.optim.Adam
    return cls(params, lr=step["lr"], weight_decay=step["weight_decay"])


def optimisation(params, step: dict, iters_per_epoch: int, amp_dtype, device: torch.device):
    """``(optimizer, scheduler, scaler)`` of a step: :func:`build_optimizer` on the trainable ``params``, the
    per-iteration :func:`lr_factor` schedule, and a grad scaler that is on only for fp16."""
    optimizer = build_optimizer(params, step)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, step, iters_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return optimizer, scheduler, scaler


class StepRun:
    """One recipe step: data, net, optimiser, schedule, loop, checkpoints (``python -m kernel.train fit``).

    ``train_df`` / ``val_df``: ``id,landmark_id`` frames; images under ``image_root`` (``val_root``); a
    validation landmark id below 0 marks a non-landmark image (the 2019 test set's distractors).
    ``margin_labels``: the landmark ids the dynamic margins are counted on (default: ``train_df``'s; the
    originals counted them on the whole label list, so a hold-out should pass the list before the split).
    The step starts from ``last.pth`` in ``out_dir`` (``resume``), else from ``init_path`` or the model.pth
    of the step its recipe names, plus (``imagenet``) timm's ImageNet weights for what that does not hold.
    A tensor that should be pretrained (:func:`kernel.train.nets.pretrained_tensors`) but got no weights
    stops the run, unless ``random_init``. :meth:`run` trains.
    """

    def __init__(self, step: dict, train_df: pd.DataFrame, val_df: pd.DataFrame, image_root, out_dir, *,
                 init_path=None, resume=False, device=None, workers=2, imagenet=False, precision="auto",
                 seed=0, val_batch_size=None, progress=True, val_root=None, sync_bn=None, random_init=False,
                 margin_labels=None, scale_lr=False, dist_timeout_min=DIST_TIMEOUT_MIN):
        self.step, self.out = step, Path(out_dir)
        self.env = setup_distributed(device, dist_timeout_min)
        self.progress = progress and self.env.main
        self.workers = workers
        self.seed = seed
        torch.manual_seed(seed + self.env.rank)
        np.random.seed(seed + self.env.rank)
        self._data(train_df, val_df, image_root, val_root, margin_labels)
        self.val_batch_size = val_batch_size or step["batch_size"]
        state = self._net(init_path, resume, imagenet, random_init, n_val=len(val_df))
        self.trainee = wrap_trainee(self.net, self.env, step["sync_bn"] if sync_bn is None else sync_bn,
                                    find_unused=bool(step["train_only"]))
        self.amp = autocast_dtype(precision, self.env.device)
        lr = check_gpu_count(step, self.env.world, scale_lr, warn=self.env.main)
        self.optimizer, self.scheduler, self.scaler = optimisation(
            self.trainee.parameters(), dict(step, lr=lr), self.iters_per_epoch, self.amp, self.env.device)
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
        self.history: list[dict] = []

    def _net(self, init_path, resume, imagenet, random_init, n_val: int):
        """The step's net with its training head, its starting weights (:meth:`_load_start`) and frozen parts,
        on the device. Returns the ``last.pth`` record when resuming, else None."""
        step = self.step
        self.net = build_net(step["arch"])
        attach_head(self.net, len(self.class_map), step["loss"]["type"], step["loss"].get("k", 3))
        state = self._load_start(init_path, resume, imagenet, random_init)
        n_train = freeze(self.net, step["train_only"])
        (log.info if self.env.main else log.debug)(
            "%s step %d: %s, %d classes, %d train / %d val images, %.2fM trainable parameters", step["recipe"],
            step["step"], step["arch"]["family"], len(self.class_map), len(self.train_ds), n_val, n_train / 1e6)
        self.net.to(self.env.device)
        return state

    def _data(self, train_df, val_df, image_root, val_root, margin_labels) -> None:
        """Class map, loss (margins), datasets, sampler and loader."""
        step, env = self.step, self.env
        # classes = the training landmarks; a validation image of another landmark can only be predicted wrong
        self.class_map = ClassMap(train_df["landmark_id"])
        classes = self.class_map.encode(train_df["landmark_id"])
        self.loss_fn = build_loss(step["loss"], margin_counts(self.class_map, classes, margin_labels)).to(env.device)
        size = step["arch"]["image_size"]
        self.train_ds = LandmarkDataset(train_df["id"], classes, image_root, train_transform(size), min_side=size)
        known = val_df["landmark_id"].map(self.class_map.index).fillna(-1).astype(np.int64)
        self.val_ds = LandmarkDataset(val_df["id"], known, val_root or image_root, eval_transform(size),
                                      min_side=size) if len(val_df) else None
        self.val_landmarks = val_df["landmark_id"].to_numpy()
        self.val_ids = val_df["id"].tolist()
        if step["sampling_power"] > 0:
            self.sampler = DistributedWeightedSampler(class_weights(classes, step["sampling_power"]),
                                                      rank=env.rank, world=env.world, seed=self.seed)
        else:
            self.sampler = DistributedSampler(self.train_ds, num_replicas=env.world, rank=env.rank,
                                              shuffle=True, seed=self.seed, drop_last=True)
        self.loader = DataLoader(self.train_ds, batch_size=step["batch_size"], sampler=self.sampler,
                                 num_workers=self.workers, drop_last=True, pin_memory=env.device.type == "cuda",
                                 persistent_workers=self.workers > 0)
        self.iters_per_epoch = len(self.loader) // step["grad_accum"]
        if self.iters_per_epoch == 0:
            raise KernelError(f"{len(self.train_ds)} training images give no full batch of "
                              f"{step['batch_size']} x {step['grad_accum']} per process: lower batch_size")

    def _load_start(self, init_path, resume, imagenet, random_init):
        """Resume state, or ImageNet + previous-step weights; refuses a step whose pretrained tensors got none.
        Returns the ``last.pth`` record when resuming, else None."""
        step = self.step
        last = self.out / "last.pth"
        if resume and last.is_file():
            state = ckpt.load_record(last)
            if (state.get("recipe"), state.get("step")) != (step["recipe"], step["step"]):
                raise KernelError(f"{last}: was written by recipe {state.get('recipe')} step {state.get('step')}, "
                                  f"not {step['recipe']} step {step['step']}")
            if state["class_map"] != self.class_map.landmark_ids:
                raise KernelError(f"{last}: its class map differs from this data (other CSV or holdout seed?)")
            self.net.load_state_dict(ckpt.from_original(state["model"], self.net.family), strict=True)
            self.start_epoch, self.it = state["epoch"] + 1, state["iteration"]
            log.info("resuming %s step %d after epoch %d", step["recipe"], step["step"], state["epoch"])
            return state
        if resume:
            log.info("--resume: no %s yet, starting the step from its beginning", last)
        self.start_epoch, self.it = 1, 0
        loaded: set[str] = set()
        if imagenet:
            for path, rep in load_imagenet(self.net, step["arch"], step.get("pretrained_tags")):
                loaded |= {f"{path}.{k}" for k in rep.loaded}
        if isinstance(step["init"], dict) or init_path:
            init = step["init"] if isinstance(step["init"], dict) else {"pop": []}
            loaded |= set(self._init_from(init_path, init).loaded)
        missing = [k for k in pretrained_tensors(self.net) if k not in loaded]
        if missing and step["init"] != "random" and not random_init:
            raise KernelError(
                f"{step['recipe']} step {step['step']} needs pretrained weights that nothing provides: "
                f"{describe_missing(missing)}. Pass --imagenet (timm's ImageNet weights, from its local cache) "
                "so they start pretrained as in the original, or --random-init to train them from random init")
        if missing and step["init"] != "random":
            log.warning("%s step %d: %d tensors that the original starts pretrained start from random init "
                        "(--random-init)", step["recipe"], step["step"], len(missing))
        return None

    def _init_from(self, path, init: dict):
        """Load the model.pth of the step ``init`` names (or ``path``); returns the transfer report."""
        if path is None:
            path = self.out.parent / f"step{init['step']}" / "model.pth"
        path = Path(path)
        if not path.is_file():
            raise KernelError(f"{path}: step {self.step['step']} starts from step {init.get('step')}'s "
                              "model.pth; train that step first or pass --init FILE")
        rec = ckpt.load_record(path)
        family = rec.get("arch", {}).get("family", self.net.family)
        sd = ckpt.from_original(rec["model"], family)
        pop = list(init.get("pop", []))
        if rec.get("class_map") != self.class_map.landmark_ids:
            pop.append(self.net.head_key + ".")
            log.info("%s: other classes than this step's data: its training head is not loaded", path)
        return ckpt.transfer(self.net, sd, pop=pop, min_fraction=0.3, what=f"init from {path}")

    # ------------------------------------------------------------------ loop
    def _forward_loss(self, x, y):
        step = self.step
        with torch.autocast(self.env.device.type, dtype=self.amp, enabled=self.amp is not None):
            if step["cutmix"]:
                mixed, ya, yb, _ = corner_cutmix(x, y, scale=tuple(step["cutmix_scale"]))
                _, logits = self.trainee(torch.cat([x, mixed]))
                plain, mix = logits[: len(x)], logits[len(x):]
                return dual_stream_loss(self.loss_fn, plain, y, mix, ya, yb)
            _, logits = self.trainee(x)
            return self.loss_fn(logits, y)

    def train_epoch(self, epoch: int) -> dict:
        step, env = self.step, self.env
        self.trainee.train()
        self.sampler.set_epoch(epoch)
        accum = step["grad_accum"]
        params = [p for p in self.trainee.parameters() if p.requires_grad]
        losses, bad, skipped = [], 0, 0
        bar = tqdm(self.loader, desc=f"{step['recipe']} s{step['step']} e{epoch}", disable=not self.progress,
                   total=self.iters_per_epoch * accum, dynamic_ncols=True)
        self.optimizer.zero_grad(set_to_none=True)
        t0, seen = time.perf_counter(), 0
        for i, (x, y) in enumerate(bar):
            if i >= self.iters_per_epoch * accum:
                break
            x = x.to(env.device, non_blocking=True)
            y = y.to(env.device, non_blocking=True)
            boundary = (i + 1) % accum == 0
            sync = contextlib.nullcontext() if boundary or not env.distributed else self.trainee.no_sync()
            with sync:
                loss = self._forward_loss(x, y)
                if not _all_finite(loss, env):
                    bad, skipped = bad + 1, skipped + 1
                    log.warning("epoch %d batch %d: non-finite loss, batch skipped (%d in a row)", epoch, i, bad)
                    if bad >= MAX_BAD_STEPS:
                        raise KernelError(f"{bad} consecutive non-finite losses: lower the lr, set clip_grad, or "
                                          "train in bf16/fp32 (--precision)")
                    self.optimizer.zero_grad(set_to_none=True)
                    continue
                self.scaler.scale(loss / accum).backward()
            losses.append(float(loss.detach()))  # a host sync per batch: the throughput below is wall time
            seen += len(x)
            if not boundary:
                continue
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(params, step["clip_grad"] or float("inf"))
            if self.scaler.is_enabled() or _all_finite(norm, env):
                self.scaler.step(self.optimizer)  # the fp16 scaler skips non-finite steps itself
                bad = 0
            else:
                bad, skipped = bad + 1, skipped + 1
                log.warning("epoch %d batch %d: non-finite gradient, step skipped", epoch, i)
                if bad >= MAX_BAD_STEPS:
                    raise KernelError(f"{bad} consecutive non-finite gradients: lower the lr or set clip_grad")
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.it += 1
            if self.progress:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
        bar.close()
        elapsed = time.perf_counter() - t0
        return {"train_loss": float(np.mean(losses)) if losses else float("nan"), "skipped_steps": skipped,
                "lr": float(self.scheduler.get_last_lr()[0]),
                # training images per second over all ranks (loading, forward, backward, step), validation apart
                "train_images_per_s": round(seen * env.world / elapsed, 1) if elapsed > 0 else float("nan")}

    def validate(self) -> dict:
        """Every rank embeds its shard of the validation images (:func:`embed_sharded`); rank 0 scores them
        (other ranks return ``{}``)."""
        if self.val_ds is None:
            return {}
        emb, preds = embed_sharded(self.net, self.val_ds, self.env, self.val_batch_size, self.workers, self.amp)
        if not self.env.main:
            return {}
        return validation_metrics(self.val_ids, self.val_landmarks, emb, preds, self.class_map,
                                  device=self.env.device)

    def save(self, epoch: int, metrics: dict) -> None:
        meta = dict(recipe=self.step["recipe"], step=self.step["step"], epoch=epoch, arch=self.step["arch"],
                    metrics=metrics)
        rec = ckpt.model_record(self.net, self.class_map, **meta)
        ckpt.atomic_save(rec, self.out / "model.pth")
        state = dict(rec, iteration=self.it, optimizer=self.optimizer.state_dict(),
                     scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict())
        ckpt.atomic_save(state, self.out / "last.pth")
        self.class_map.save(self.out / "class_map.csv")
        with open(self.out / "history.jsonl", "a") as fh:
            fh.write(json.dumps({"epoch": epoch, **metrics}) + "\n")

    def run(self, validate_before: bool = False) -> list[dict]:
        step, env = self.step, self.env
        if env.main:
            self.out.mkdir(parents=True, exist_ok=True)
        last_epoch = step["stop_at"] or step["epochs"]
        if validate_before:
            m = {"epoch": 0, **self.validate()}
            if env.main:
                log.info("before training: %s", _fmt(m))
                self.history.append(m)
        for epoch in range(self.start_epoch, last_epoch + 1):
            t0 = time.time()
            m = self.train_epoch(epoch)
            m.update(self.validate())
            if env.main:
                m["seconds"] = round(time.time() - t0, 1)
                self.save(epoch, m)
                log.info("epoch %d/%d: %s", epoch, last_epoch, _fmt(m))
                self.history.append({"epoch": epoch, **m})
            if env.distributed:
                dist.barrier()
        return self.history


def _fmt(m: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items())
