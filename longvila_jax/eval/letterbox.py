"""Upstream V-NIAH's ``image_aspect_ratio="pad"``: letterbox onto a mean-colour square, then resize.

Both embedding scripts of ``llava/eval/vision_niah_vila`` set ``image_aspect_ratio = "pad"``, so
``process_image`` (``llava/mm_utils.py``) pastes every haystack frame and needle image onto a
square of side ``max(w, h)`` filled with the image processor's mean colour,
``tuple(int(x * 255) for x in image_mean)`` = (127, 127, 127) for SigLIP's mean 0.5, at offset
``(0, (w - h) // 2)`` for a wide image or ``((h - w) // 2, 0)`` for a tall one, before the
processor's bicubic resize (``data.image.resize_rgb``, as ``SiglipImageProcessor``).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from longvila_jax.data.image import SIGLIP_MEAN, resize_rgb

# int(0.5 * 255) = 127 per channel, as upstream truncates it.
PAD_FILL = (int(SIGLIP_MEAN * 255),) * 3


def expand_to_square(image: np.ndarray, fill: tuple[int, int, int] = PAD_FILL) -> np.ndarray:
    """Letterboxes uint8 [H, W, 3] onto a ``fill``-coloured square [S, S, 3], S = max(H, W),
    centred as upstream's ``expand2square`` (a square image is returned unchanged)."""
    height, width = image.shape[:2]
    if height == width:
        return image
    side = max(height, width)
    out = np.empty((side, side, 3), np.uint8)
    out[...] = np.asarray(fill, np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    out[top : top + height, left : left + width] = image
    return out


def pad_and_resize(image: np.ndarray, size: int, fill: tuple[int, int, int] = PAD_FILL):
    """``expand_to_square`` then the bicubic resize to ``size``: uint8 [size, size, 3]."""
    return resize_rgb(Image.fromarray(expand_to_square(np.asarray(image, np.uint8), fill)), size)


__all__ = ["PAD_FILL", "expand_to_square", "pad_and_resize"]
