"""Descriptor extraction: one pass over a split's images feeding every model, into the descriptor store.

    python -m kernel extract --manifest M --weights W --images SRC --split NAME --store S [--models a,b]

How the loop works (:func:`extract`, :mod:`kernel.extract.loop`):

- Every image is decoded once, in ``DataLoader`` worker processes (one per CPU core), and resized there once
  per distinct model input size (cv2 INTER_LINEAR). Only uint8 crosses to the device (pinned memory on CUDA);
  normalisation (ImageNet mean/std) happens on the device, once per size, shared by the models of that size.
- The models of a *group* are held at the same time and all fed from the same decoded batch. By default a
  group is every model that fits in half the device memory (so on Kaggle's P100 the whole ensemble is one
  pass); ``group_size`` forces a number (1 = model by model: the images are decoded once per model).
- On CUDA: fp16 autocast, channels_last, cudnn autotuning, a batch size per model that halves on
  out-of-memory and stays halved; a NaN/inf guard recomputes the affected items in fp32 (the hybrid models
  overflow in fp16, docs/architectures.md#hybrid-swin-transformer) and switches a model to fp32 for good when most of its items need it.
  On a CPU-only machine the same loop runs in fp32.
- Broken images (missing, empty, truncated, not an image, too large) never stop the run: they are written
  with their reason to ``STORE/failures/<split>.csv`` and counted in the summary; known failures are not
  retried on resume (``retry_failures`` to force).
- Finished work survives: descriptors are written as atomic shards (``STORE/<model>/<split>.parts/``) every
  ``flush_images`` images or ``flush_seconds`` seconds, on a deadline, on Ctrl-C and on any error. A new run
  skips every id already in a shard or in ``<split>.npz``; when a model's split is complete the shards are
  consolidated into ``<split>.npz`` (in id order). A completed split is never recomputed.
- Every visible GPU is used: with more than one device (and at least a few batches each) the call runs one
  worker process per device on an interleaved share of the images and merges their shards at the end, exactly
  as the ``shard`` recipe below does (:mod:`kernel.multidevice`).
- Offline train/index extraction on many machines: ``shard=(i, n)`` (``--shard i/n``, or torchrun's
  RANK/WORLD_SIZE) takes every n-th image, writes its shards in its own part-number range and failures to
  ``failures/<split>.shard-i-of-n.csv``, and never consolidates. Copy the ``.parts`` folders and failure files
  of all shards into one store and run once more without a shard: nothing is left to compute, the shards
  are merged into ``<split>.npz``.
"""
from __future__ import annotations

from kernel.devices import resolve_device
from kernel.extract.api import extract
from kernel.extract.cli import HELP, add_arguments, run
from kernel.extract.planning import DEFAULT_BATCH, model_bytes, plan_groups
from kernel.extract.runner import ModelRunner, is_oom
from kernel.extract.summary import ExtractSummary, Progress

__all__ = ["HELP", "DEFAULT_BATCH", "ExtractSummary", "ModelRunner", "Progress", "add_arguments", "extract",
           "is_oom", "model_bytes", "plan_groups", "resolve_device", "run"]
