"""The clip reader's child: ``data.sandbox``'s killable decode process serving probes and clips.

``python -m longvila_jax.data.clip_child`` speaks ``data.sandbox``'s protocol (length-prefixed
JSON requests, raw uint8 bytes back, no pickle) and is started and killed by the
``data.sandbox.DecodeSandbox`` of a ``data.clips.ClipReader``. A request is
``{"op": "probe" | "clip", "path": ..., ...}`` (``data.clips.child_request``).
"""

from __future__ import annotations

from longvila_jax.data.clips import child_request
from longvila_jax.data.sandbox import _main

if __name__ == "__main__":
    _main(child_request)
