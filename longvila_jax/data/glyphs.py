"""Bitmap digits and flat colours for synthetic frames whose content survives lossy codecs.

Answers to synthetic questions (numbers, colours) are drawn as large flat blocks: a 3x5 pixel
font scaled up by an integer factor, on a uniform background, so that yuv420p chroma subsampling
and quantisation (a few levels of error, stack.md §7) cannot change what a frame shows.
"""

from __future__ import annotations

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 220, 40),
    "purple": (140, 40, 180),
    "orange": (240, 140, 20),
    "gray": (128, 128, 128),
    "teal": (20, 150, 150),
}

_DIGITS = {
    "0": ("111", "101", "101", "101", "111"),
    "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"),
    "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"),
    "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"),
    "7": ("111", "001", "010", "010", "010"),
    "8": ("111", "101", "111", "101", "111"),
    "9": ("111", "101", "111", "001", "111"),
}


def glyph(ch: str) -> np.ndarray:
    """bool [5, 3] bitmap of a digit."""
    return np.array([[c == "1" for c in row] for row in _DIGITS[ch]], dtype=bool)


def render_number(
    text: str,
    size: int,
    background: tuple[int, int, int],
    ink: tuple[int, int, int] = (0, 0, 0),
) -> np.ndarray:
    """Draws a string of digits centred on a flat background.

    Args:
      text: digits to draw (1-3 characters fit well).
      size: frame side in pixels.
      background, ink: RGB colours.

    Returns:
      uint8 [size, size, 3].
    """
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = background
    if not text:
        return img
    cols = 4 * len(text) - 1  # 3 columns per glyph plus 1 gap
    scale = max(1, min((size * 3 // 4) // cols, (size * 3 // 4) // 5))
    h, w = 5 * scale, cols * scale
    top, left = (size - h) // 2, (size - w) // 2
    for k, ch in enumerate(text):
        bits = np.kron(glyph(ch), np.ones((scale, scale), dtype=bool))
        x0 = left + 4 * k * scale
        img[top : top + h, x0 : x0 + 3 * scale][bits] = ink
    return img


def read_number(img: np.ndarray, n_digits: int, tol: int = 60) -> str:
    """Reads back digits drawn by ``render_number`` (tests of decoded frames).

    Args:
      img: uint8 [size, size, 3] frame, possibly after a lossy codec.
      n_digits: how many digits were drawn.
      tol: per-channel distance from the background that counts as ink.

    Returns:
      The digits recognised ("?" for a cell that matches no glyph).
    """
    size = img.shape[0]
    cols = 4 * n_digits - 1
    scale = max(1, min((size * 3 // 4) // cols, (size * 3 // 4) // 5))
    top, left = (size - 5 * scale) // 2, (size - cols * scale) // 2
    bg = img[1, 1].astype(np.int32)
    out = []
    for k in range(n_digits):
        cell = np.zeros((5, 3), dtype=bool)
        for r in range(5):
            for c in range(3):
                y = top + r * scale + scale // 2
                x = left + (4 * k + c) * scale + scale // 2
                cell[r, c] = np.abs(img[y, x].astype(np.int32) - bg).max() > tol
        match = [d for d in _DIGITS if np.array_equal(glyph(d), cell)]
        out.append(match[0] if match else "?")
    return "".join(out)


__all__ = ["COLOURS", "glyph", "read_number", "render_number"]
