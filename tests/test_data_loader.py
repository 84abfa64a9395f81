"""The decode loader: one decode per image, one resize per distinct size, broken images returned as
failures, worker processes giving the same batches as in-process decoding; device-side normalisation."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from kernel.data.decode import decode_resized
from kernel.data.loader import make_loader, to_model_input
from kernel.models import IMAGENET_MEAN, IMAGENET_STD


def _records(tmp_path, n=7, broken=(2, 5)):
    recs = []
    rng = np.random.default_rng(0)
    for i in range(n):
        p = tmp_path / f"im{i}.jpg"
        if i in broken:
            p.write_bytes(b"not an image")
        else:
            h, w = rng.integers(20, 90, 2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p, "JPEG")
        recs.append((f"im{i}", str(p)))
    return recs


def _collect(loader):
    index, images, failed = [], {}, []
    for b in loader:
        index += b["index"].tolist()
        failed += b["failed"]
        for s, t in b["images"].items():
            assert t.dtype == torch.uint8 and t.shape[1:] == (s, s, 3)
            images.setdefault(s, []).append(t)
    return index, {s: torch.cat(v) for s, v in images.items()}, failed


def test_batches_hold_every_size_and_report_failures(tmp_path):
    recs = _records(tmp_path)
    index, images, failed = _collect(make_loader(recs, [32, 48, 32], batch_size=3, workers=0))
    assert index == [0, 1, 3, 4, 6]
    assert [i for i, _ in failed] == [2, 5] and all("not an image" in r for _, r in failed)
    assert sorted(images) == [32, 48]
    for row, i in enumerate(index):
        ref = decode_resized(recs[i][1], [32, 48])
        np.testing.assert_array_equal(images[48][row].numpy(), ref[48])


def test_worker_processes_give_the_same_batches(tmp_path):
    recs = _records(tmp_path)
    a = _collect(make_loader(recs, [40], batch_size=2, workers=0))
    b = _collect(make_loader(recs, [40], batch_size=2, workers=2))
    assert a[0] == b[0] and a[2] == b[2]
    assert torch.equal(a[1][40], b[1][40])


def test_a_batch_of_only_broken_images(tmp_path):
    recs = _records(tmp_path, n=2, broken=(0, 1))
    (batch,) = list(make_loader(recs, [32], batch_size=4, workers=0))
    assert batch["index"].numel() == 0 and batch["images"] == {} and len(batch["failed"]) == 2


def test_normalisation_on_the_device_matches_imagenet_stats():
    x = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    y = to_model_input(x, IMAGENET_MEAN, IMAGENET_STD, "cpu")
    assert y.shape == (2, 3, 8, 8) and y.dtype == torch.float32 and y.is_contiguous()
    ref = (x.permute(0, 3, 1, 2).float() - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(y, ref)
    z = to_model_input(x, IMAGENET_MEAN, IMAGENET_STD, "cpu", channels_last=True)
    assert z.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(z, ref)
