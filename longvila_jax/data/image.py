"""Image loading with Pillow (decompression-bomb guard on) and SigLIP preprocessing in numpy.

Images are converted to 8-bit RGB whatever their mode (grayscale, palette, alpha, CMYK, 16-bit or
float), resized to a square with bicubic filtering (as HF ``SiglipImageProcessor`` does) and
normalised channels-last with SigLIP's mean = std = 0.5 after scaling by 1/255.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from longvila_jax.core.safe_paths import open_regular
from longvila_jax.data.skips import SampleSkipped

SIGLIP_MEAN = 0.5
SIGLIP_STD = 0.5


def normalize(frames: np.ndarray) -> np.ndarray:
    """SigLIP normalisation of uint8 RGB pixels.

    Args:
      frames: uint8 [..., H, W, 3].

    Returns:
      float32 [..., H, W, 3], ``(x / 255 - 0.5) / 0.5`` in [-1, 1].
    """
    x = frames.astype(np.float32) * np.float32(1.0 / 255.0)
    return (x - np.float32(SIGLIP_MEAN)) / np.float32(SIGLIP_STD)


def to_rgb(img: Image.Image) -> Image.Image:
    """Converts any Pillow mode to 8-bit RGB (alpha dropped, CMYK and 16-bit mapped)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit/32-bit grayscale: Pillow's convert("L") clips instead of rescaling.
        arr = np.asarray(img).astype(np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr8 = np.clip(np.rint(arr * (255.0 / hi)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def resize_rgb(img: Image.Image, size: int) -> np.ndarray:
    """Bicubic resize to ``size`` x ``size``; returns uint8 [size, size, 3]."""
    img = to_rgb(img)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


class _NotRegular(Exception):
    """``open_regular``'s refusal, turned into a skip."""


def load_image(path: str | Path, size: int, max_pixels: int | None = None) -> np.ndarray:
    """Reads one image file.

    Args:
      path: image file (any format Pillow reads).
      size: output side in pixels.
      max_pixels: width x height limit; ``None`` keeps Pillow's ``Image.MAX_IMAGE_PIXELS``.

    Returns:
      uint8 [size, size, 3].

    Raises:
      SampleSkipped: ``not_regular_file`` (missing, FIFO, device...), ``empty_file``,
        ``corrupt_image`` or ``image_too_large``.
    """
    path = Path(path)
    try:  # O_NONBLOCK + fstat: a FIFO swapped in after the manifest check cannot block us
        f = open_regular(path, "image", _NotRegular)
    except _NotRegular as e:
        raise SampleSkipped("not_regular_file", str(e)) from None
    with f:
        if os.fstat(f.fileno()).st_size == 0:
            raise SampleSkipped("empty_file", str(path))
        return _decode(f, path, size, max_pixels)


def _decode(f, path: Path, size: int, max_pixels: int | None) -> np.ndarray:
    limit = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f) as img:
                # Checked on the header, before any pixel is decoded.
                w, h = img.size
                if limit is not None and w * h > limit:
                    raise SampleSkipped("image_too_large", f"{path}: {w}x{h} > {limit} pixels")
                img.load()
                return resize_rgb(img, size)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SampleSkipped("image_too_large", f"{path}: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise SampleSkipped("corrupt_image", f"{path}: {type(e).__name__}: {e}") from None


__all__ = ["SIGLIP_MEAN", "SIGLIP_STD", "load_image", "normalize", "resize_rgb", "to_rgb"]
