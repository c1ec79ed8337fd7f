"""V-NIAH after the training demo: a synthetic haystack and number needles, made here, then
:func:`eval.vniah.run_vniah` at multiples of the training frame count (the demo's step 5).

Nothing is downloaded: the haystack is a flat-colour video and each needle a frame showing its
secret number (``eval.needles``), so the check runs on any machine right after training.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from longvila_jax.eval.needles import make_haystack_video, make_needles, write_needles
from longvila_jax.eval.vniah import DEFAULT_DEPTHS, run_vniah


def demo_vniah(
    model,
    tokenizer,
    out_dir: str | Path,
    train_frames: int,
    *,
    multiples: Sequence[int] = (1, 2, 4),
    depths: Sequence[float] = DEFAULT_DEPTHS,
    mesh=None,
    numbers: Sequence[str] | None = None,
    count: int = 5,
    seed: int = 0,
    batch_size: int = 1,
) -> dict:
    """V-NIAH after training: synthetic haystack + number needles, at multiples of the
    training frame count; writes ``haystack.mp4``, ``needles/``, ``results.json`` and
    ``heatmap.png`` under ``out_dir``.

    Args:
      model, tokenizer: the trained model and its tokenizer.
      out_dir: output folder (created).
      train_frames: frames per video the model was trained with.
      multiples: frame counts are ``train_frames * m``.
      depths: needle depths.
      mesh: optional mesh for the sequence-parallel forward.
      numbers: secret numbers of the needles (e.g. the held-out split, see
        ``needles.numbers_from_manifest``); default ``count`` random two-digit numbers.
      count: needles when ``numbers`` is None.
      seed: haystack colours and default numbers.
      batch_size: depths per forward.

    Returns:
      The :func:`run_vniah` results.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = [train_frames * m for m in multiples]
    size = model.cfg.vision.image_size
    make_haystack_video(out / "haystack.mp4", max(counts), size=size, seed=seed)
    needles = make_needles(count, size=size, seed=seed, numbers=numbers)
    write_needles(out / "needles", needles)
    return run_vniah(
        model,
        tokenizer,
        out / "haystack.mp4",
        needles,
        counts,
        depths,
        mesh=mesh,
        out_dir=out,
        batch_size=batch_size,
        title=f"V-NIAH (trained with {train_frames} frames)",
    )


__all__ = ["demo_vniah"]
