"""V-NIAH (visual needle in a haystack), port of ``llava/eval/vision_niah_vila`` (VILA main).

    python -m longvila_jax.eval.vniah --model DIR --haystack VIDEO --needles DIR \\
        --frames 8,16,32 --depths 0,0.2,0.4,0.6,0.8,1 [--mesh configs/mesh/cpu8_r2u4.yaml] \\
        [--out DIR]

Procedure (longvila.md §8), per frame count n, depth d and needle:

1. Haystack: the video decoded at 1 frame per second (``eval.haystack``), the first n such
   frames. All frames are encoded once (vision tower + projector in batches) and every prompt
   gathers its rows from that table.
2. The needle image is inserted before haystack frame ``int(d * n)`` (n + 1 frames in all).
3. Prompt ``[template pre-prompt | frames | question | post-prompt | answer]``, rendered with
   the chat template the model was trained with (``infer.prompts``); teacher-forced single
   forward (``infer.scoring``).
4. Exact match of the argmax predictions at the answer positions against the answer, both
   lower-cased with whitespace removed (the decoded text is compared; token equality, the
   original's criterion, is recorded as ``token_match``). Cell score = mean over needles.

Frame separators: our training prompt is ``"<image>\\n" * n + question`` (197 positions per frame
for the real models), while upstream V-NIAH concatenates frame embeddings without separators
(196). We follow our training by default; ``newline_after_frame=False`` (``--no-newline``)
reproduces upstream. Other deviations: upstream's Qwen2 pre-prompt says "You are a helpful
assistant." with a full stop, our training template has none; padding positions get segment id
0 instead of EOS tokens (neither changes the causal answer logits).

With a mesh the forward runs sequence-parallel (2D MM-SP attention on the zigzag layout, see
``infer.scoring``), as the original zigzag-shards it over 8 processes.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from longvila_jax.eval.cli import add_common_arguments, parse_numbers, run_command
from longvila_jax.eval.haystack import cell_visual_index, insert_position, load_haystack
from longvila_jax.eval.needles import (
    Needle,
    load_needles,
    make_haystack_video,
    make_needles,
    write_needles,
)
from longvila_jax.eval.report import write_results
from longvila_jax.infer.prompts import answer_ids, prompt_ids, template_for
from longvila_jax.infer.scoring import TeacherForcedScorer, score_answer
from longvila_jax.models.vlm import ExpandedInputs, expand_prompts

DEFAULT_DEPTHS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def normalize_answer(text: str) -> str:
    """Lower-cased, every whitespace character removed."""
    return "".join(text.lower().split())


def exact_match(prediction: str, answer: str) -> bool:
    """Upstream-style exact match, insensitive to case and spaces."""
    return normalize_answer(prediction) == normalize_answer(answer)


def _needle_prompts(
    tokenizer, cfg, needles: Sequence[Needle], n: int, template: str, newline: bool
) -> list[tuple[ExpandedInputs, np.ndarray, np.ndarray]]:
    """(expanded prompt + answer [1, T], answer ids [K], query positions [K]) per needle, for
    n haystack frames + the needle (which frame slot holds the needle is decided later)."""
    out = []
    for needle in needles:
        prompt = prompt_ids(
            tokenizer,
            needle.question,
            n + 1,
            template=template,
            image_token_id=cfg.image_token_id,
            newline_after_frame=newline,
        )
        answer = answer_ids(tokenizer, needle.answer, f"needle {needle.id}: the answer")
        expanded = expand_prompts(
            np.concatenate([prompt, answer])[None],
            num_frames=n + 1,
            image_token_id=cfg.image_token_id,
            tokens_per_frame=cfg.tokens_per_frame,
            vocab_size=cfg.llm.vocab_size,
        )
        prompt_len = expanded.text_ids.shape[1] - answer.size
        # Logits at position p predict token p + 1: the answer is read from prompt_len - 1 on.
        query = np.arange(prompt_len - 1, prompt_len - 1 + answer.size, dtype=np.int32)
        out.append((expanded, answer, query))
    return out


def _check_grid(frame_counts: list[int], depths: list[float], batch_size: int) -> None:
    if not frame_counts or min(frame_counts) < 1:
        raise ValueError(f"frame_counts must be positive integers, got {frame_counts}")
    if not depths:
        raise ValueError("depths must not be empty")
    if len(set(depths)) != len(depths) or len(set(frame_counts)) != len(frame_counts):
        raise ValueError(f"frame_counts {frame_counts} and depths {depths} must not repeat")
    for depth in depths:
        insert_position(1, depth)  # validates the range
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def run_vniah(
    model,
    tokenizer,
    haystack: str | Path | np.ndarray,
    needles: str | Path | Sequence[Needle],
    frame_counts: Sequence[int],
    depths: Sequence[float] = DEFAULT_DEPTHS,
    *,
    mesh=None,
    out_dir: str | Path | None = None,
    template: str | None = None,
    newline_after_frame: bool = True,
    batch_size: int = 1,
    encode_batch: int = 32,
    title: str = "V-NIAH",
    progress: bool = False,
) -> dict:
    """Runs V-NIAH; writes ``results.json`` and ``heatmap.png`` when ``out_dir`` is given.

    Args:
      model: a ``LongVILA``.
      tokenizer: its fast tokenizer (``<image>`` special token).
      haystack: video path, or uint8 [N, S, S, 3] frames already at 1 fps.
      needles: a needles folder (``eval.needles``) or a list of :class:`Needle`.
      frame_counts: haystack frame counts n (the prompt holds n + 1 frames).
      depths: needle depths in [0, 1].
      mesh: optional mesh for the sequence-parallel forward (``parallel.mesh.make_mesh``).
      out_dir: where to write the results (created); None writes nothing.
      template: ``qwen2`` / ``llama_3``; default from the model's LLM architecture.
      newline_after_frame: ``"\\n"`` after every frame (our training) or none (upstream).
      batch_size: depths per forward (a memory knob; 1 as upstream).
      encode_batch: frames per vision-tower call.
      title: heatmap title.
      progress: print one line per cell.

    Returns:
      The results dict (see ``results.json``): per-cell scores and per-needle predictions,
      ``scores`` as a [len(depths), len(frame_counts)] list, ``mean_score``.
    """
    cfg = model.cfg
    t0 = time.perf_counter()
    frame_counts = [int(n) for n in frame_counts]
    depths = [float(d) for d in depths]
    _check_grid(frame_counts, depths, batch_size)
    template = template or template_for(cfg)
    size = cfg.vision.image_size
    max_n = max(frame_counts)
    if isinstance(haystack, np.ndarray):
        if haystack.shape[0] < max_n:
            raise ValueError(f"haystack: {haystack.shape[0]} frames given, {max_n} needed")
        haystack_frames = haystack[:max_n]
    else:
        haystack_frames = load_haystack(haystack, max_n, size)
    if not isinstance(needles, (list, tuple)):
        needles = load_needles(needles, size)

    scorer = TeacherForcedScorer(model, mesh, encode_batch=encode_batch)
    tokens_per_frame = cfg.tokens_per_frame
    # One table: haystack frames 0..max_n-1, then the needles (rows max_n + j). Every cell's
    # prompt only points its frame slots at rows of it; nothing is encoded twice.
    needle_images = np.stack([needle.image for needle in needles])
    table = scorer.encode(np.concatenate([haystack_frames, needle_images]))

    cells, lengths = [], {}
    for n in frame_counts:
        prompts = _needle_prompts(tokenizer, cfg, needles, n, template, newline_after_frame)
        # Every prompt of this frame count is padded to one length: one compilation for all.
        longest = max(expanded.text_ids.shape[1] for expanded, _, _ in prompts)
        length = scorer.padded_length(longest)
        lengths[n] = length
        per_depth = {d: [] for d in depths}
        for j, (needle, (expanded, answer, query)) in enumerate(zip(needles, prompts, strict=True)):
            # The prompt's text is the same at every depth; only where the needle's visual
            # tokens sit differs, so a batch row per depth differs in visual_index alone.
            rows = [
                cell_visual_index(expanded.visual_index[0], n, d, max_n + j, tokens_per_frame)
                for d in depths
            ]
            for start in range(0, len(depths), batch_size):
                chunk = rows[start : start + batch_size]
                real = len(chunk)
                chunk = chunk + [chunk[-1]] * (batch_size - real)  # constant batch: one compile
                b = len(chunk)
                logits = scorer.logits_at(
                    np.repeat(expanded.text_ids, b, axis=0),
                    np.stack(chunk),
                    table,
                    np.repeat(query[None], b, axis=0),
                    pad_to=length,
                )
                for r in range(real):  # the padding rows of the last batch are dropped
                    scored = score_answer(logits[r], answer)
                    text = tokenizer.decode(
                        scored.predicted_ids.tolist(), skip_special_tokens=False
                    )
                    per_depth[depths[start + r]].append(
                        {
                            "needle": needle.id,
                            "answer": needle.answer,
                            "prediction": text,
                            "exact": exact_match(text, needle.answer),
                            "token_match": scored.exact_match,
                            # Soft score: log-probability of the whole teacher-forced answer.
                            "answer_logprob": float(scored.logprobs.sum()),
                        }
                    )
        for d in depths:
            needle_results = per_depth[d]
            cell_score = float(np.mean([r["exact"] for r in needle_results]))
            if progress:
                print(f"frames {n:>6} depth {d:.2f}: {cell_score:.3f}")
            cells.append(
                {
                    "frames": n,
                    "depth": d,
                    "insert_at": insert_position(n, d),
                    "score": cell_score,
                    "results": needle_results,
                }
            )
    score = {(c["frames"], c["depth"]): c["score"] for c in cells}
    results = {
        "title": title,
        "frame_counts": frame_counts,
        "depths": depths,
        "needles": [needle.id for needle in needles],
        "template": template,
        "newline_after_frame": newline_after_frame,
        "tokens_per_frame": tokens_per_frame,
        "sequence_length": {str(n): lengths[n] for n in frame_counts},
        "mesh": None if mesh is None else {k: int(v) for k, v in mesh.shape.items()},
        "scores": [[score[(n, d)] for n in frame_counts] for d in depths],  # rows: depths
        "mean_score": float(np.mean([c["score"] for c in cells])),
        "cells": cells,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if out_dir is not None:
        write_results(results, out_dir)
    return results


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


def main(argv: list[str] | None = None) -> int:
    """``python -m longvila_jax.eval.vniah``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m longvila_jax.eval.vniah", description="V-NIAH")
    add_common_arguments(parser)
    parser.add_argument("--haystack", required=True, help="haystack video (decoded at 1 fps)")
    parser.add_argument(
        "--needles", required=True, help="needles folder (longvila_jax.eval.needles)"
    )
    parser.add_argument(
        "--frames", required=True, type=parse_numbers, help="e.g. 8,16 or 300:6000:300"
    )
    parser.add_argument(
        "--depths", type=lambda s: parse_numbers(s, float), default="0,0.2,0.4,0.6,0.8,1"
    )
    parser.add_argument("--out", default="vniah_out", help="results folder")
    parser.add_argument("--batch-size", type=int, default=1, help="depths per forward")
    parser.add_argument("--title", default="V-NIAH")
    args = parser.parse_args(argv)

    def evaluate(model, tokenizer, **options) -> str:
        results = run_vniah(
            model, tokenizer, args.haystack, args.needles, args.frames, args.depths,
            out_dir=args.out, batch_size=args.batch_size, title=args.title, progress=True,
            **options,
        )  # fmt: skip
        mean, seconds = results["mean_score"], results["seconds"]
        return f"V-NIAH mean score {mean:.4f} ({seconds} s); wrote {args.out}"

    return run_command(args, evaluate)


if __name__ == "__main__":
    sys.exit(main())
