"""Label conventions shared by the data pipeline, the layouts and the losses.

``IGNORE_INDEX`` marks a position that has no target (prompt, visual and padding tokens, the
last token of a packed segment): PyTorch's and HF's cross-entropy convention, which VILA's
data code follows, so labels written by either side mean the same thing.
"""

from __future__ import annotations

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX"]
