"""V-NIAH (visual needle in a haystack), port of ``llava/eval/vision_niah_vila`` (VILA main).

    python -m longvila_jax.eval.vniah --model DIR --haystack VIDEO --needles DIR \\
        --frames 8,16,32 --depths 0,0.2,0.4,0.6,0.8,1 [--mesh configs/mesh/cpu8_r2u4.yaml] \\
        [--out DIR] [--faithful | --pad --upstream-prompt --no-rope-scaling] [--rope-theta X]

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

Default mode (the model as trained and served): frames are resized to the square, the prompt is
``"<image>\\n" * n + question`` (197 positions per frame for the real models) rendered with the
checkpoint's chat template (``infer.chat_format``: for Qwen2 the system text "You are a helpful
assistant" without a full stop, as upstream's own ``qwen2.jinja`` and our training have it),
and RoPE follows the checkpoint's config.

Faithful mode (``--faithful``, upstream's published measurement; each part is also its own
option):

- ``pad`` (``--pad``): every haystack frame and needle image is letterboxed onto a mean-colour
  square before the resize, as both upstream embedding scripts set ``image_aspect_ratio="pad"``
  (``eval.letterbox``);
- ``upstream_prompt`` (``--upstream-prompt``): upstream's fixed pre/post-prompts
  (``infer.prompts.VNIAH_PROMPTS``; Qwen2's system text "You are a helpful assistant." *with*
  its full stop) around bare frames (196 positions per frame) and the question, each piece
  tokenised without the automatic BOS (``safe_tokenize``);
- ``ignore_rope_scaling`` (``--no-rope-scaling``, in ``--faithful`` for Qwen2 only, where
  upstream used its ring Qwen2 that builds RoPE from ``rope_theta`` alone; its Llama path is HF
  ``LlamaForCausalLM``, which applies the scaling): the run's config drops ``llm.rope_scaling``,
  so the 1M release is evaluated without the linear /4, as its 6000-frame numbers were;
  ``rope_theta`` (``--rope-theta``) overrides theta like upstream's ``--rope_theta``
  (``eval.rope_override``).

The full stop stays out of the default: it belongs to upstream's hard-coded V-NIAH prompt, not to
the template the releases were trained with, so only the faithful mode reproduces it.
Remaining deviation: padding positions get segment id 0 instead of EOS tokens (neither changes
the causal answer logits).

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
)
from longvila_jax.eval.report import write_results
from longvila_jax.eval.rope_override import rope_overrides, with_config_overrides
from longvila_jax.infer.chat_format import TEMPLATE_OF_ARCH, ChatFormat, chat_format
from longvila_jax.infer.prompts import answer_ids, prompt_ids, vniah_upstream_ids
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
    tokenizer,
    cfg,
    needles: Sequence[Needle],
    n: int,
    template: str | ChatFormat,
    newline: bool,
    upstream_prompt: bool,
) -> list[tuple[ExpandedInputs, np.ndarray, np.ndarray]]:
    """(expanded prompt + answer [1, T], answer ids [K], query positions [K]) per needle, for
    n haystack frames + the needle (which frame slot holds the needle is decided later)."""
    out = []
    for needle in needles:
        if upstream_prompt:
            prompt = vniah_upstream_ids(
                tokenizer,
                needle.question,
                n + 1,
                template=template,
                image_token_id=cfg.image_token_id,
            )
        else:
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
    template: str | ChatFormat | None = None,
    newline_after_frame: bool = True,
    pad: bool = False,
    upstream_prompt: bool = False,
    ignore_rope_scaling: bool = False,
    rope_theta: float | None = None,
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
      template: a built-in name (``qwen2`` / ``llama_3``) or a ``ChatFormat``; default the
        tokenizer's own template, else the built-in one of the LLM architecture. With
        ``upstream_prompt`` a built-in name (default from the architecture).
      newline_after_frame: ``"\\n"`` after every frame (our training) or none (upstream).
      pad: letterbox frames and needles onto a mean-colour square first (upstream "pad");
        applies to a haystack video and a needles folder read here (arrays and ``Needle``
        lists are taken as already preprocessed).
      upstream_prompt: upstream's fixed V-NIAH prompt (module docstring).
      ignore_rope_scaling: evaluate with ``llm.rope_scaling`` removed (upstream's ring Qwen2).
      rope_theta: evaluate with this RoPE theta.
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
    model = with_config_overrides(model, rope_overrides(ignore_rope_scaling, rope_theta))
    cfg = model.cfg
    if upstream_prompt:
        template = template or TEMPLATE_OF_ARCH[cfg.llm.arch]
        if not isinstance(template, str):
            raise ValueError("upstream_prompt takes a built-in template name, not a ChatFormat")
        newline_after_frame = False  # upstream concatenates the frames bare
    elif template is None:
        template = chat_format(tokenizer, cfg.llm.arch)
    template_name = template if isinstance(template, str) else template.name
    size = cfg.vision.image_size
    max_n = max(frame_counts)
    if isinstance(haystack, np.ndarray):
        if haystack.shape[0] < max_n:
            raise ValueError(f"haystack: {haystack.shape[0]} frames given, {max_n} needed")
        haystack_frames = haystack[:max_n]
    else:
        haystack_frames = load_haystack(haystack, max_n, size, pad=pad)
    if not isinstance(needles, (list, tuple)):
        needles = load_needles(needles, size, pad=pad)

    scorer = TeacherForcedScorer(model, mesh, encode_batch=encode_batch)
    tokens_per_frame = cfg.tokens_per_frame
    # One table: haystack frames 0..max_n-1, then the needles (rows max_n + j). Every cell's
    # prompt only points its frame slots at rows of it; nothing is encoded twice.
    needle_images = np.stack([needle.image for needle in needles])
    table = scorer.encode(np.concatenate([haystack_frames, needle_images]))

    cells, lengths = [], {}
    for n in frame_counts:
        prompts = _needle_prompts(
            tokenizer, cfg, needles, n, template, newline_after_frame, upstream_prompt
        )
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
        "template": template_name,
        "newline_after_frame": newline_after_frame,
        "pad": pad,
        "upstream_prompt": upstream_prompt,
        "rope_theta": cfg.llm.rope_theta,
        "rope_scaling": None if cfg.llm.rope_scaling is None else cfg.llm.rope_scaling.factor,
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
    parser.add_argument(
        "--faithful",
        action="store_true",
        help="upstream's measurement: --pad --upstream-prompt, and --no-rope-scaling for Qwen2",
    )
    parser.add_argument(
        "--pad", action="store_true", help="letterbox frames/needles on a mean-colour square"
    )
    parser.add_argument(
        "--upstream-prompt",
        action="store_true",
        help="upstream's fixed V-NIAH prompt ('You are a helpful assistant.'), bare frames",
    )
    parser.add_argument(
        "--no-rope-scaling", action="store_true", help="ignore llm.rope_scaling for this run"
    )
    parser.add_argument("--rope-theta", type=float, help="RoPE theta for this run")
    args = parser.parse_args(argv)

    def evaluate(model, tokenizer, **options) -> str:
        upstream_prompt = args.faithful or args.upstream_prompt
        if upstream_prompt:
            options["template"] = args.template  # a built-in name (or None: from the arch)
        no_scaling = args.no_rope_scaling or (args.faithful and model.cfg.llm.arch == "qwen2")
        results = run_vniah(
            model, tokenizer, args.haystack, args.needles, args.frames, args.depths,
            out_dir=args.out, batch_size=args.batch_size, title=args.title, progress=True,
            pad=args.faithful or args.pad, upstream_prompt=upstream_prompt,
            ignore_rope_scaling=no_scaling, rope_theta=args.rope_theta, **options,
        )  # fmt: skip
        mean, seconds = results["mean_score"], results["seconds"]
        return f"V-NIAH mean score {mean:.4f} ({seconds} s); wrote {args.out}"

    return run_command(args, evaluate)


if __name__ == "__main__":
    sys.exit(main())
