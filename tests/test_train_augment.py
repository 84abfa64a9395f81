"""Corner-Cutmix geometry and labels, the dual-stream loss, Cutout, the 2021 pipeline."""

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from kernel.data.decode import decode_image, decode_resized
from kernel.demo import SAMPLE_DIR
from kernel.models import IMAGENET_MEAN, IMAGENET_STD
from kernel.train.augment import Cutout, JpegQuality, SquareResize, eval_transform, train_transform
from kernel.train.data import LandmarkDataset
from kernel.train.cutmix import corner_cutmix, dual_stream_loss, paste_corner


def _constant_batch(n=8, size=32):
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, size, size).clone()


def test_corner_cutmix_geometry_and_labels():
    size = 32
    x = _constant_batch(8, size)
    y = torch.arange(100, 108)
    g = torch.Generator().manual_seed(3)
    mixed, ya, yb, boxes = corner_cutmix(x, y, scale=(0.3, 0.6), generator=g)
    assert mixed.shape == x.shape
    assert torch.equal(yb, y)
    corners_seen = set()
    for i in range(8):
        y0, x0, y1, x1 = boxes[i].tolist()
        side = y1 - y0
        assert side == x1 - x0 and round(0.3 * size) <= side <= round(0.6 * size)
        assert y0 in (0, size - side) and x0 in (0, size - side)  # a corner
        corners_seen.add((y0 == 0, x0 == 0))
        a = int(ya[i]) - 100  # the pasted image (constant value = its index)
        inside = mixed[i, :, y0:y1, x0:x1]
        assert torch.allclose(inside, torch.full_like(inside, float(a)))
        outside = mixed[i].clone()
        outside[:, y0:y1, x0:x1] = float(i)
        assert torch.equal(outside, x[i])  # everything else is still image B
    assert len(corners_seen) >= 2
    assert sorted(ya.tolist()) == y.tolist()  # A is a permutation of the batch


def test_paste_corner_resizes_the_whole_image():
    base = torch.zeros(3, 20, 20)
    patch = torch.zeros(3, 40, 40)
    patch[:, :20, :] = 1.0  # top half white
    out = paste_corner(base, patch, 10, corner=3)  # bottom right
    assert torch.all(out[:, 10:14, 10:20] > 0.9) and torch.all(out[:, 16:20, 10:20] < 0.1)
    assert torch.all(out[:, :10, :] == 0) and torch.all(out[:, :, :10] == 0)


def test_dual_stream_loss_weights():
    def loss(logits, t):
        return (logits.sum(dim=1) * t.float()).mean()

    lp, lm = torch.randn(4, 3), torch.randn(4, 3)
    y, ya = torch.tensor([1, 2, 3, 4]), torch.tensor([4, 3, 2, 1])
    got = dual_stream_loss(loss, lp, y, lm, ya, y)
    assert torch.allclose(got, loss(lp, y) + 0.5 * loss(lm, ya) + 0.5 * loss(lm, y))


def test_cutout_one_clipped_hole():
    torch.manual_seed(0)
    cut = Cutout(0.4, p=1.0)
    for _ in range(20):
        img = torch.ones(3, 50, 50)
        out = cut(img)
        holes = (out == 0).all(dim=0)
        n = int(holes.sum())
        assert 0 < n <= 20 * 20
        rows, cols = holes.any(dim=1).nonzero().flatten(), holes.any(dim=0).nonzero().flatten()
        assert n == len(rows) * len(cols)  # one rectangle
        assert torch.equal(img, torch.ones(3, 50, 50))  # input untouched
    assert torch.equal(Cutout(0.4, p=0.0)(torch.ones(3, 8, 8)), torch.ones(3, 8, 8))


def test_pipelines_output_normalised_squares():
    img = torch.randint(0, 256, (3, 70, 110), dtype=torch.uint8)
    for t in (train_transform(48), eval_transform(48)):
        out = t(img)
        assert out.shape == (3, 48, 48) and out.dtype == torch.float32
        assert -3 < float(out.mean()) < 3
    gray = torch.full((3, 10, 10), 128, dtype=torch.uint8)
    # ImageNet normalisation on the 0-255 scale
    assert abs(float(eval_transform(10)(gray)[0, 0, 0]) - (128 - 123.675) / 58.395) < 1e-4


def test_jpeg_quality_round_trip_is_near_lossless_at_99():
    torch.manual_seed(0)
    ramp = torch.linspace(0, 255, 24).expand(16, 24)
    img = torch.stack([ramp, ramp.flip(1), torch.full((16, 24), 90.0)]).to(torch.uint8)  # smooth, photo-like
    out = JpegQuality(99, 100)(img)
    assert out.shape == img.shape and out.dtype == torch.uint8
    assert (out.float() - img.float()).abs().mean() < 3


PHOTOS = sorted(SAMPLE_DIR.glob("*.jpg"))


@pytest.mark.skipif(not PHOTOS, reason="the bundled sample photos are missing")
def test_training_decode_and_resize_equal_the_kernels_inference_ones_on_a_real_photo(tmp_path):
    """A model must train on the pixels the kernel will feed it: the dataset decodes with the inference
    decoder and the pipelines' resize is the inference resize (cv2 bilinear, no antialiasing)."""
    photo = PHOTOS[0]
    (tmp_path / photo.name).write_bytes(photo.read_bytes())
    for size in (64, 224, 448):
        want = decode_resized(photo, [size])[size]  # what extraction feeds a model of this size
        ds = LandmarkDataset([photo.stem], [0], tmp_path, transform=None, min_side=size)
        img, _ = ds[0]
        assert torch.equal(img.permute(1, 2, 0), torch.from_numpy(np.array(decode_image(photo, min_side=size))))
        resize = [t for t in train_transform(size).transforms if isinstance(t, SquareResize)]
        assert len(resize) == 1  # the training pipeline resizes exactly once, with the inference resize
        assert np.array_equal(resize[0](img).permute(1, 2, 0).numpy(), want)
        norm = eval_transform(size)(img)
        expect = (torch.from_numpy(want).permute(2, 0, 1).float() - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) \
            / torch.tensor(IMAGENET_STD).view(3, 1, 1)
        assert torch.allclose(norm, expect, atol=1e-5)
    # and it is not torchvision's antialiased resize, which differs visibly on a downscale
    small = v2.Resize((64, 64), antialias=True)(img)
    assert (small.float() - SquareResize(64)(img).float()).abs().mean() > 0.5


def test_shift_scale_rotate_interpolates_bilinearly():
    affine = train_transform(32).transforms[2].transforms[0]
    assert isinstance(affine, v2.RandomAffine) and affine.interpolation == v2.InterpolationMode.BILINEAR
