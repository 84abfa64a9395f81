"""Decoding survives what real data holds: every mode and format listed in issue 3, EXIF orientation, huge
images in bounded memory, and broken files (reported with a reason, never raised as anything else)."""
from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from kernel.data.decode import DecodeError, decode_image, decode_resized, resize_square
from kernel.demo import SAMPLE_DIR

SAMPLES = sorted(SAMPLE_DIR.glob("*.jpg"))


def _rgb(h=48, w=64, seed=0) -> np.ndarray:
    """A smooth colour image (JPEG-friendly) with distinct channels."""
    y, x = np.mgrid[0:h, 0:w]
    r = (x * 255 / max(w - 1, 1)).astype(np.uint8)
    g = (y * 255 / max(h - 1, 1)).astype(np.uint8)
    b = np.full((h, w), 40 + seed, np.uint8)
    return np.stack([r, g, b], axis=2)


def _save(path: Path, im: Image.Image, fmt: str, **kw) -> Path:
    im.save(path, fmt, **kw)
    return path


def test_jpeg_matches_cv2_imread_the_training_decoder():
    for f in SAMPLES[:3]:
        ours = decode_image(f)
        ref = cv2.imread(str(f), cv2.IMREAD_COLOR)[:, :, ::-1]
        assert ours.dtype == np.uint8 and ours.shape == ref.shape
        assert np.abs(ours.astype(int) - ref).mean() < 0.5


def test_png_behind_a_jpg_name_decodes_exactly(tmp_path):
    a = _rgb()
    p = _save(tmp_path / "x.jpg", Image.fromarray(a), "PNG")
    np.testing.assert_array_equal(decode_image(p), a)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    g = _rgb()[:, :, 0]
    for fmt, name in (("PNG", "g.png"), ("JPEG", "g.jpg")):
        out = decode_image(_save(tmp_path / name, Image.fromarray(g, "L"), fmt))
        assert out.shape == (*g.shape, 3)
        assert (out[:, :, 0] == out[:, :, 1]).all() and (out[:, :, 1] == out[:, :, 2]).all()
        assert np.abs(out[:, :, 0].astype(int) - g).mean() < 2
    bw = Image.fromarray(g > 128).convert("1")
    out = decode_image(_save(tmp_path / "bw.png", bw, "PNG"))
    assert set(np.unique(out)) <= {0, 255}


def test_cmyk_jpeg(tmp_path):
    im = Image.new("CMYK", (32, 24), (0, 255, 255, 0))  # pure red in CMYK
    out = decode_image(_save(tmp_path / "c.jpg", im, "JPEG", quality=95))
    assert out.shape == (24, 32, 3)
    r, g, b = out[12, 16].astype(int)
    assert r > 200 and g < 50 and b < 50


def test_alpha_is_dropped_like_cv2(tmp_path):
    a = _rgb()
    alpha = np.zeros(a.shape[:2], np.uint8)  # fully transparent: the colour channels must survive
    rgba = Image.fromarray(np.dstack([a, alpha]), "RGBA")
    np.testing.assert_array_equal(decode_image(_save(tmp_path / "a.png", rgba, "PNG")), a)
    la = Image.fromarray(np.dstack([a[:, :, 0], alpha]), "LA")
    out = decode_image(_save(tmp_path / "la.png", la, "PNG"))
    np.testing.assert_array_equal(out[:, :, 1], a[:, :, 0])
    pal = Image.fromarray(a).convert("P")
    pal.info["transparency"] = 0
    out = decode_image(_save(tmp_path / "p.png", pal, "PNG", transparency=0))
    assert out.shape == a.shape


def test_16_bit_keeps_the_high_byte(tmp_path):
    g16 = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    out = decode_image(_save(tmp_path / "g16.png", Image.fromarray(g16), "PNG"))
    np.testing.assert_array_equal(out[:, :, 2], (g16 >> 8).astype(np.uint8))
    rgb16 = np.dstack([g16, g16 // 2, g16 // 4])
    ok, buf = cv2.imencode(".png", rgb16[:, :, ::-1])  # cv2 writes BGR
    assert ok
    p = tmp_path / "rgb16.png"
    p.write_bytes(buf.tobytes())
    np.testing.assert_array_equal(decode_image(p), (rgb16 >> 8).astype(np.uint8))
    np.testing.assert_array_equal(decode_image(p), cv2.imread(str(p))[:, :, ::-1])


def test_float_image(tmp_path):
    f = np.linspace(0, 1, 48 * 64, dtype=np.float32).reshape(48, 64)
    out = decode_image(_save(tmp_path / "f.tif", Image.fromarray(f, "F"), "TIFF"))
    assert out.dtype == np.uint8 and out[0, 0, 0] == 0 and out[-1, -1, 0] == 255


def test_exif_orientation_is_applied(tmp_path):
    a = _rgb(40, 80)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # stored rotated: display = rotate 90 degrees clockwise
    p = _save(tmp_path / "o.jpg", im, "JPEG", exif=exif.tobytes(), quality=95)
    out = decode_image(p)
    assert out.shape == (80, 40, 3)
    # the stored left column (red = 0) becomes the displayed top row
    assert out[0, :, 0].mean() < 30 and out[-1, :, 0].mean() > 225
    ref = cv2.imread(str(p))[:, :, ::-1]  # cv2 applies EXIF orientation as well
    assert ref.shape == out.shape


def test_huge_jpeg_is_decoded_at_a_reduced_scale(tmp_path):
    w, h = 8000, 6000  # 48 MP: above the draft threshold
    big = Image.fromarray(cv2.resize(_rgb(60, 80), (w, h), interpolation=cv2.INTER_LINEAR))
    p = _save(tmp_path / "big.jpg", big, "JPEG", quality=80)
    out = decode_image(p, min_side=512)
    assert out.shape == (750, 1000, 3)  # 1/8 scale: the coarsest that keeps both sides >= 512
    small = decode_resized(p, [128, 512])
    assert small[512].shape == (512, 512, 3) and small[128].shape == (128, 128, 3)
    # same picture as a full decode, resized
    full = decode_image(p, min_side=None)
    assert full.shape == (h, w, 3)
    assert np.abs(resize_square(full, 128).astype(int) - small[128]).mean() < 3


def test_draft_never_goes_below_the_model_size(tmp_path):
    p = _save(tmp_path / "m.jpg", Image.fromarray(_rgb(600, 1000)), "JPEG")
    out = decode_image(p, min_side=200, draft_pixels=1000)
    assert out.shape == (300, 500, 3)  # 1/2: 1/4 would make the short side 150 < 200


def test_too_large_non_jpeg_is_refused(tmp_path):
    p = _save(tmp_path / "big.png", Image.new("RGB", (2000, 1500)), "PNG")
    with pytest.raises(DecodeError, match="too large"):
        decode_image(p, min_side=64, max_pixels=1_000_000)


@pytest.mark.parametrize("kind,reason", [
    ("missing", "missing file"),
    ("empty", "empty file"),
    ("text", "not an image"),
    ("truncated_jpeg", "truncated"),
    ("truncated_png", "truncated|corrupt"),
    ("garbage_jpeg", "corrupt|truncated|not an image"),
])
def test_broken_images_raise_decode_error_with_a_reason(tmp_path, kind, reason):
    good = io.BytesIO()
    Image.fromarray(_rgb(200, 300)).save(good, "JPEG", quality=90)
    png = io.BytesIO()
    Image.fromarray(_rgb(200, 300)).save(png, "PNG")
    p = tmp_path / f"{kind}.jpg"
    if kind == "empty":
        p.write_bytes(b"")
    elif kind == "text":
        p.write_text("<html>404 not found</html>")
    elif kind == "truncated_jpeg":
        p.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    elif kind == "truncated_png":
        p.write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    elif kind == "garbage_jpeg":
        p.write_bytes(b"\xff\xd8\xff\xe0" + bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)))
    with pytest.raises(DecodeError, match=reason):
        decode_image(p)


def test_tiny_image_resizes(tmp_path):
    p = _save(tmp_path / "one.png", Image.new("RGB", (1, 1), (10, 20, 30)), "PNG")
    out = decode_resized(p, [64, 32, 64])
    assert sorted(out) == [32, 64]
    assert (out[64] == np.array([10, 20, 30], np.uint8)).all()


def test_resize_is_cv2_inter_linear_on_the_full_image():
    a = _rgb(50, 70)
    np.testing.assert_array_equal(resize_square(a, 32), cv2.resize(a, (32, 32), interpolation=cv2.INTER_LINEAR))
    square = np.ascontiguousarray(a[:32, :32])
    assert resize_square(square, 32) is square  # already the size: no resampling
