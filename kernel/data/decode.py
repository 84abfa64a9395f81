"""Robust image decoding: any file a real dataset holds -> RGB uint8 (H, W, 3), or a :class:`DecodeError`
whose message is the reason recorded in the store's failure list.

- Formats: whatever Pillow reads (JPEG, PNG also behind a ``.jpg`` name, WebP, BMP, TIFF, GIF first frame).
- Modes: grayscale, palette, CMYK (Adobe-inverted JPEGs included), RGBA / LA (alpha dropped, as
  ``cv2.imread`` does, which is what the original training pipeline decoded with), 16-bit (high byte, as
  ``cv2.imread`` does), float.
- EXIF orientation is applied (``cv2.imread`` applies it too).
- Bounded memory: a JPEG above ``draft_pixels`` is decoded at a reduced DCT scale (1/2, 1/4 or 1/8) that still
  keeps both sides >= ``min_side`` (the largest model input), so a 100-megapixel photo costs a few megabytes;
  an image that cannot be reduced while decoding and exceeds ``max_pixels`` is refused ("too large").
  Pillow's own decompression-bomb limit is switched off on purpose (``Image.MAX_IMAGE_PIXELS = None``):
  it would refuse large JPEGs that the draft mode decodes cheaply; ``max_pixels`` replaces it, and
  ``max_declared`` refuses, before anything is decoded, a header that declares more pixels than any camera
  writes (a decompression bomb: a few kilobytes claiming 60000 x 60000 pixels).
- Broken files (missing, empty, truncated, not an image, corrupt data) raise :class:`DecodeError`.

Resizing (:func:`resize_square`) is ``cv2.resize(INTER_LINEAR)`` on the full image, as the original code's
albumentations ``Resize`` did.
"""
from __future__ import annotations

import os

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# OpenCV's own thread pool is not fork-safe: once a process has used it, a DataLoader worker forked from
# that process deadlocks in its first cv2 threading call. Decoding parallelism comes from worker processes,
# so cv2 stays single-threaded everywhere, set here, before any pool can exist.
cv2.setNumThreads(1)

# Deliberate: the limit below (max_pixels, checked after the JPEG draft reduction) replaces Pillow's.
Image.MAX_IMAGE_PIXELS = None

DRAFT_PIXELS = 16_000_000  # JPEGs above this are decoded at a reduced scale (memory, speed)
MAX_PIXELS = 120_000_000  # anything still above this after the reduction is refused (~360 MB as RGB)
# our reading: declared dimensions above this are a decompression bomb, not a photo (the largest camera
# sensors write about 200 megapixels); refused from the header alone, before decoding
MAX_DECLARED_PIXELS = 250_000_000


class DecodeError(Exception):
    """An image that cannot be used; ``str(exc)`` is the short reason written to the failure list."""


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any Pillow mode -> contiguous RGB uint8 (H, W, 3)."""
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im)
        if mode == "F":
            a = np.nan_to_num(a.astype(np.float32))
            a = a * 255.0 if a.max(initial=0.0) <= 1.0 else a
            g = np.clip(a + 0.5, 0, 255).astype(np.uint8)
        elif mode.startswith("I;16") or a.max(initial=0) > 255:  # 16-bit samples: keep the high byte (cv2)
            g = (np.clip(a.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        else:
            g = np.clip(a, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(g[:, :, None], 3, axis=2))
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # the direct P -> RGB conversion warns about byte transparency
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8))


def decode_image(
    path: str | os.PathLike,
    min_side: int | None = None,
    draft_pixels: int = DRAFT_PIXELS,
    max_pixels: int = MAX_PIXELS,
    max_declared: int = MAX_DECLARED_PIXELS,
) -> np.ndarray:
    """Decode ``path`` to an RGB uint8 array (H, W, 3), EXIF orientation applied.

    ``min_side``: the largest size the image will be resized to; a JPEG larger than ``draft_pixels`` is
    decoded at the coarsest DCT scale whose both sides stay >= ``min_side`` (never below it). Without
    ``min_side`` no reduced decoding happens. Raises :class:`DecodeError` with a short reason.
    """
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise DecodeError("missing file") from None
    except OSError as exc:
        raise DecodeError(f"unreadable file ({exc.strerror or exc})") from None
    if size == 0:
        raise DecodeError("empty file")
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w <= 0 or h <= 0:
                raise DecodeError(f"zero-size image ({w}x{h})")
            if w * h > max_declared:
                raise DecodeError(f"declared size {w}x{h} exceeds the decompression-bomb limit of "
                                  f"{max_declared} pixels")
            if im.format == "JPEG" and min_side and w * h > draft_pixels:
                im.draft("RGB", (min_side, min_side))  # scale 1/2..1/8 keeping both sides >= min_side
            dw, dh = im.size
            if dw * dh > max_pixels:
                raise DecodeError(f"too large ({w}x{h} pixels, limit {max_pixels})")
            im.load()
            try:
                im = ImageOps.exif_transpose(im) or im
            except Exception:  # a malformed EXIF block: keep the stored orientation
                pass
            rgb = _to_rgb(im)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not an image (unknown format)") from None
    except OSError as exc:
        msg = str(exc)
        if "truncated" in msg or "broken data stream" in msg or "premature end" in msg.lower():
            raise DecodeError(f"truncated image ({msg})") from None
        raise DecodeError(f"corrupt image ({msg or type(exc).__name__})") from None
    except (ValueError, SyntaxError, MemoryError, Image.DecompressionBombError, EOFError) as exc:
        raise DecodeError(f"corrupt image ({type(exc).__name__}: {exc})") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise DecodeError(f"unusable image (decoded shape {rgb.shape})")
    return rgb


def resize_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """Resize the full image to ``size`` x ``size`` with bilinear interpolation (cv2 INTER_LINEAR)."""
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return rgb
    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_LINEAR)


def decode_resized(path, sizes, draft_pixels: int = DRAFT_PIXELS, max_pixels: int = MAX_PIXELS) -> dict:
    """Decode once, resize once per distinct size: ``{size: uint8 (size, size, 3)}``."""
    sizes = sorted(set(int(s) for s in sizes))
    rgb = decode_image(path, min_side=max(sizes), draft_pixels=draft_pixels, max_pixels=max_pixels)
    return {s: resize_square(rgb, s) for s in sizes}
