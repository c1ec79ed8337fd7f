"""The server's decoder child: ``data.sandbox``'s killable decode process with both frame rules.

``python -m longvila_jax.serve.decode_child`` speaks ``data.sandbox``'s protocol (length-prefixed
JSON requests, raw uint8 frames back, no pickle) and is started and killed by a
``data.sandbox.DecodeSandbox`` (``serve.media``). A request names its rule: ``training``
(``data.video.decode_video``, what ``infer.Generator.load_frames`` uses for checkpoints this
project trained) or ``inference`` (``infer.frames.decode_inference_frames``, upstream's rule for
released checkpoints), so the server reads exactly the frames the CLI reads.
"""

from __future__ import annotations

import numpy as np

from longvila_jax.data.sandbox import _main
from longvila_jax.data.video import decode_video


def decode(rule: str, path: str, size: int, num_frames: int, fps: float) -> np.ndarray:
    """Frames of one video as ``infer.Generator.load_frames`` reads them.

    Args:
      rule: ``training`` or ``inference`` (module docstring).
      path: the video file.
      size: the tower's image size.
      num_frames: frames wanted (already defaulted by the caller).
      fps: ``training``: the ``max_fps`` cap (0 = none); ``inference``: upstream's fps.

    Returns:
      uint8 [n, size, size, 3].
    """
    if rule == "inference":
        # Imported here: ``infer`` pulls in jax (seconds of start-up), which a child serving
        # only this project's checkpoints never needs.
        from longvila_jax.infer.frames import decode_inference_frames

        return decode_inference_frames(path, size, num_frames, fps)
    return decode_video(path, size, num_frames, max_fps=fps, min_frames=1)


if __name__ == "__main__":
    _main(decode)
