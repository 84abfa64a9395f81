"""Decoding in worker processes: a torch ``DataLoader`` that decodes every image once and hands over, per
batch, one uint8 tensor per distinct model input size (resized on the CPU with cv2, as the original code).

A batch is a dict::

    {"index":  int64 (n,)            positions (in the record list) of the images that decoded,
     "images": {size: uint8 (n, size, size, 3)},
     "failed": [(position, reason), ...]}

Broken images never stop the loader: they come back in ``failed``. Normalisation happens later, on the
device (:func:`to_model_input`), so only uint8 crosses the worker pipe and the host-to-GPU copy.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kernel.data.decode import DRAFT_PIXELS, MAX_PIXELS, DecodeError, decode_resized


class DecodeDataset(Dataset):
    """``records[i]`` -> ``(i, {size: uint8 HWC} or None, reason)``."""

    def __init__(self, records, sizes, draft_pixels: int = DRAFT_PIXELS, max_pixels: int = MAX_PIXELS):
        self.records = list(records)
        self.sizes = sorted(set(int(s) for s in sizes))
        self.draft_pixels = draft_pixels
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        try:
            return i, decode_resized(self.records[i][1], self.sizes, self.draft_pixels, self.max_pixels), ""
        except DecodeError as exc:
            return i, None, str(exc)
        except Exception as exc:  # a decoder bug must not end a 12-hour run either
            return i, None, f"decode error ({type(exc).__name__}: {exc})"


def collate(items) -> dict:
    ok = [(i, imgs) for i, imgs, _ in items if imgs is not None]
    failed = [(i, reason) for i, imgs, reason in items if imgs is None]
    sizes = list(ok[0][1]) if ok else []
    return {
        "index": torch.tensor([i for i, _ in ok], dtype=torch.int64),
        "images": {s: torch.from_numpy(np.stack([imgs[s] for _, imgs in ok])) for s in sizes},
        "failed": failed,
    }


def _worker_init(_):
    # one decoding thread per worker process: the workers are the parallelism. (cv2 is made single-threaded
    # when kernel.data.decode is imported, in the parent: calling cv2.setNumThreads here, after a fork from a
    # process whose cv2 pool had started, deadlocks.)
    torch.set_num_threads(1)


def default_workers() -> int:
    """One decode worker per CPU core available to this process."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def decode_workers(device_type: str) -> int:
    """The default decode processes of an extraction: one per core when a GPU runs the models, half of the
    cores on a CPU-only run (whose forward needs the cores itself)."""
    return default_workers() if device_type == "cuda" else max(1, default_workers() // 2)


def make_loader(records, sizes, batch_size: int, workers: int | None = None, pin_memory: bool = False,
                prefetch: int = 4, draft_pixels: int = DRAFT_PIXELS, max_pixels: int = MAX_PIXELS) -> DataLoader:
    """Batches of decoded images in record order (``workers=0`` decodes in the calling process)."""
    workers = default_workers() if workers is None else workers
    ds = DecodeDataset(records, sizes, draft_pixels, max_pixels)
    return DataLoader(
        ds, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
        pin_memory=pin_memory, worker_init_fn=_worker_init if workers else None,
        prefetch_factor=prefetch if workers else None, persistent_workers=False,
    )


def to_model_input(x: torch.Tensor, mean, std, device, channels_last: bool = False) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> normalised float (B, 3, S, S) on ``device``: ``(x - mean) / std`` (0-255 scale)."""
    x = x.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    x = (x - m) / s
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
