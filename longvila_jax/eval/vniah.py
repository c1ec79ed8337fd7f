"""V-NIAH (visual needle in a haystack), port of ``llava/eval/vision_niah_vila`` (VILA main).

    python -m longvila_jax.eval.vniah --model DIR --haystack VIDEO --needles DIR \\
        --frames 8,16,32 --depths 0,0.2,0.4,0.6,0.8,1 [--mesh configs/mesh/cpu8_r2u4.yaml] \\
        [--out DIR]

Procedure (longvila.md §8), per frame count n, depth d and needle:

1. Haystack: the video decoded at 1 frame per second (every ``round(avg_fps)``-th frame, from
   frame 0), the first n such frames. All frames are encoded once (vision tower + projector in
   batches) and every prompt gathers its rows from that table.
2. The needle image is inserted before haystack frame ``int(d * n)`` (n + 1 frames in all).
3. Prompt ``[template pre-prompt | frames | question | post-prompt | answer]``, rendered with
   the chat template the model was trained with (``data.text``); teacher-forced single forward.
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
``eval.forward``), as the original zigzag-shards it over 8 processes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np

from longvila_jax.data.text import IMAGE_TOKEN, TEMPLATES
from longvila_jax.eval.needles import Needle, load_needles

DEFAULT_DEPTHS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def one_fps_indices(frame_count: int, avg_fps: float, max_frames: int) -> np.ndarray:
    """Frame indices of the 1 fps haystack: every ``round(avg_fps)``-th frame from 0.

    Args:
      frame_count: frames in the video.
      avg_fps: the stream's average frame rate (Python ``round``, as upstream).
      max_frames: at most this many indices.

    Returns:
      int64 [min(max_frames, ceil(frame_count / step))].
    """
    if avg_fps <= 0 or not np.isfinite(avg_fps):
        raise ValueError(f"haystack: average fps must be positive, got {avg_fps}")
    step = max(1, round(avg_fps))
    return np.arange(0, frame_count, step, dtype=np.int64)[:max_frames]


def load_haystack(path: str | Path, max_frames: int, size: int) -> np.ndarray:
    """Decodes the first ``max_frames`` 1 fps frames of a video (sequential decode).

    Returns:
      uint8 [max_frames, size, size, 3].

    Raises:
      ValueError: unreadable video or fewer than ``max_frames`` frames at 1 fps.
    """
    path = Path(path)
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as e:
        raise ValueError(f"haystack {path}: cannot open ({e})") from None
    with container:
        if not container.streams.video:
            raise ValueError(f"haystack {path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = float(stream.average_rate or 0)
        step = max(1, round(fps)) if fps > 0 else 1
        # Unknown length: ask for max_frames indices and find out while decoding.
        count = int(stream.frames or 0) or max_frames * step
        keep = set(one_fps_indices(count, fps, max_frames).tolist())
        frames = []
        for i, frame in enumerate(container.decode(stream)):
            if i in keep:
                rgb = frame.to_ndarray(
                    width=size, height=size, format="rgb24", interpolation="BICUBIC"
                )
                frames.append(rgb)
                if len(frames) == max_frames:
                    break
    if len(frames) < max_frames:
        raise ValueError(
            f"haystack {path}: only {len(frames)} frames at 1 fps ({fps:.3g} fps video), "
            f"{max_frames} needed for the largest frame count"
        )
    return np.stack(frames)


def insert_position(n_frames: int, depth: float) -> int:
    """Index of the needle among the n + 1 frames: ``int(depth * n_frames)`` (as upstream)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    return int(depth * n_frames)


def frame_sources(n_frames: int, depth: float, needle_row: int) -> np.ndarray:
    """Table row of each of the n + 1 frame slots: haystack 0..n-1 with the needle inserted.

    Returns:
      int64 [n_frames + 1]: ``needle_row`` at ``insert_position``, haystack indices elsewhere.
    """
    k = insert_position(n_frames, depth)
    hay = np.arange(n_frames, dtype=np.int64)
    return np.concatenate([hay[:k], [needle_row], hay[k:]])


def cell_visual_index(
    visual_index: np.ndarray, n_frames: int, depth: float, needle_row: int, tokens_per_frame: int
) -> np.ndarray:
    """Points the n + 1 frame slots of an expanded prompt at the haystack/needle table rows.

    Args:
      visual_index: [T] from ``expand_inputs`` for n + 1 placeholders (slot s, token o is
        ``s * tokens_per_frame + o``; -1 for text).
      n_frames: haystack frames n.
      depth: needle depth.
      needle_row: frame row of the needle in the visual-token table.
      tokens_per_frame: visual tokens per frame.

    Returns:
      int32 [T]: ``frame_sources(...)[s] * tokens_per_frame + o`` at visual positions, -1 else.
    """
    slot, offset = visual_index // tokens_per_frame, visual_index % tokens_per_frame
    src = frame_sources(n_frames, depth, needle_row)
    rows = src[np.maximum(slot, 0)] * tokens_per_frame + offset
    return np.where(visual_index >= 0, rows, -1).astype(np.int32)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def normalize_answer(text: str) -> str:
    """Lower-cased, every whitespace character removed."""
    return "".join(text.lower().split())


def exact_match(prediction: str, answer: str) -> bool:
    """Upstream-style exact match, insensitive to case and spaces."""
    return normalize_answer(prediction) == normalize_answer(answer)


def template_for(cfg) -> str:
    """Chat template of a model config: ``qwen2`` for Qwen2, ``llama_3`` for Llama."""
    return "qwen2" if cfg.llm.arch == "qwen2" else "llama_3"


def prompt_ids(
    tokenizer,
    question: str,
    n_frames: int,
    *,
    template: str,
    image_token_id: int,
    newline_after_frame: bool = True,
) -> np.ndarray:
    """Token ids of ``[pre-prompt | n frame placeholders | question | post-prompt]``.

    Args:
      tokenizer: HF fast tokenizer whose ``<image>`` is one special token.
      question: the user question.
      n_frames: placeholders to emit.
      template: ``qwen2`` or ``llama_3`` (``data.text.TEMPLATES``).
      image_token_id: placeholder id of the model (the tokenizer's ``<image>`` is mapped to it).
      newline_after_frame: ``"<image>\\n"`` per frame (our training) or bare ``<image>``.

    Returns:
      int32 [T] with exactly ``n_frames`` ``image_token_id`` entries.
    """
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {sorted(TEMPLATES)}, got {template!r}")
    sep = "\n" if newline_after_frame else ""
    content = (IMAGE_TOKEN + sep) * n_frames + question.strip()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}],
        chat_template=TEMPLATES[template],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
    tok_image = int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    found = int((ids == tok_image).sum())
    if found != n_frames:
        raise ValueError(
            f"tokenizer: {IMAGE_TOKEN} is not a single special token ({found} ids "
            f"{tok_image} for {n_frames} frames)"
        )
    if tok_image != image_token_id:
        if (ids == image_token_id).any():
            raise ValueError(f"prompt text contains the model's placeholder id {image_token_id}")
        ids = np.where(ids == tok_image, image_token_id, ids).astype(np.int32)
    return ids


def _needle_prompts(tokenizer, cfg, needles, n, template, newline):
    from longvila_jax.models.vlm import expand_inputs

    out = []
    for nd in needles:
        prompt = prompt_ids(
            tokenizer,
            nd.question,
            n + 1,
            template=template,
            image_token_id=cfg.image_token_id,
            newline_after_frame=newline,
        )
        answer = np.asarray(tokenizer(nd.answer, add_special_tokens=False)["input_ids"], np.int32)
        if answer.size == 0:
            raise ValueError(f"needle {nd.id}: the answer {nd.answer!r} tokenizes to nothing")
        ex = expand_inputs(
            np.concatenate([prompt, answer])[None],
            num_frames=n + 1,
            image_token_id=cfg.image_token_id,
            tokens_per_frame=cfg.tokens_per_frame,
            vocab_size=cfg.llm.vocab_size,
        )
        prompt_len = ex.text_ids.shape[1] - answer.size
        # Logits at position p predict token p + 1: the answer is read from prompt_len - 1 on.
        query = np.arange(prompt_len - 1, prompt_len - 1 + answer.size, dtype=np.int32)
        out.append((ex, answer, query))
    return out


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
    from longvila_jax.eval.forward import TeacherForcedScorer

    cfg = model.cfg
    t0 = time.perf_counter()
    frame_counts = [int(n) for n in frame_counts]
    depths = [float(d) for d in depths]
    if not frame_counts or min(frame_counts) < 1:
        raise ValueError(f"frame_counts must be positive integers, got {frame_counts}")
    if not depths:
        raise ValueError("depths must not be empty")
    if len(set(depths)) != len(depths) or len(set(frame_counts)) != len(frame_counts):
        raise ValueError(f"frame_counts {frame_counts} and depths {depths} must not repeat")
    for d in depths:
        insert_position(1, d)  # validates the range
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    template = template or template_for(cfg)
    size = cfg.vision.image_size
    max_n = max(frame_counts)
    if isinstance(haystack, np.ndarray):
        if haystack.shape[0] < max_n:
            raise ValueError(f"haystack: {haystack.shape[0]} frames given, {max_n} needed")
        hay_frames = haystack[:max_n]
    else:
        hay_frames = load_haystack(haystack, max_n, size)
    if not isinstance(needles, (list, tuple)):
        needles = load_needles(needles, size)

    scorer = TeacherForcedScorer(model, mesh, encode_batch=encode_batch)
    tpf = cfg.tokens_per_frame
    # One table: haystack frames 0..max_n-1, then the needles (rows max_n + j).
    table = scorer.encode(np.concatenate([hay_frames, np.stack([nd.image for nd in needles])]))

    cells, lengths = [], {}
    for n in frame_counts:
        prompts = _needle_prompts(tokenizer, cfg, needles, n, template, newline_after_frame)
        length = scorer.padded_length(max(ex.text_ids.shape[1] for ex, _, _ in prompts))
        lengths[n] = length
        per_depth = {d: [] for d in depths}
        for j, (nd, (ex, answer, query)) in enumerate(zip(needles, prompts, strict=True)):
            rows = [cell_visual_index(ex.visual_index[0], n, d, max_n + j, tpf) for d in depths]
            for start in range(0, len(depths), batch_size):
                chunk = rows[start : start + batch_size]
                real = len(chunk)
                chunk = chunk + [chunk[-1]] * (batch_size - real)  # constant batch: one compile
                b = len(chunk)
                logits = scorer.logits_at(
                    np.repeat(ex.text_ids, b, axis=0),
                    np.stack(chunk),
                    table,
                    np.repeat(query[None], b, axis=0),
                    pad_to=length,
                )
                pred = logits.argmax(-1)
                logp = _log_softmax(logits)
                for r in range(real):
                    text = tokenizer.decode(pred[r].tolist(), skip_special_tokens=False)
                    per_depth[depths[start + r]].append(
                        {
                            "needle": nd.id,
                            "answer": nd.answer,
                            "prediction": text,
                            "exact": exact_match(text, nd.answer),
                            "token_match": bool(np.array_equal(pred[r], answer)),
                            # Soft score: log-probability of the whole teacher-forced answer.
                            "answer_logprob": float(
                                np.take_along_axis(logp[r], answer[:, None], axis=-1).sum()
                            ),
                        }
                    )
        for d in depths:
            res = per_depth[d]
            if progress:
                print(f"frames {n:>6} depth {d:.2f}: {np.mean([r['exact'] for r in res]):.3f}")
            cells.append(
                {
                    "frames": n,
                    "depth": d,
                    "insert_at": insert_position(n, d),
                    "score": float(np.mean([r["exact"] for r in res])),
                    "results": res,
                }
            )
    score = {(c["frames"], c["depth"]): c["score"] for c in cells}
    results = {
        "title": title,
        "frame_counts": frame_counts,
        "depths": depths,
        "needles": [nd.id for nd in needles],
        "template": template,
        "newline_after_frame": newline_after_frame,
        "tokens_per_frame": tpf,
        "sequence_length": {str(n): lengths[n] for n in frame_counts},
        "mesh": None if mesh is None else {k: int(v) for k, v in mesh.shape.items()},
        "scores": [[score[(n, d)] for n in frame_counts] for d in depths],
        "mean_score": float(np.mean([c["score"] for c in cells])),
        "cells": cells,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if out_dir is not None:
        from longvila_jax.eval.report import write_results

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
    from longvila_jax.eval.needles import make_haystack_video, make_needles, write_needles

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


if __name__ == "__main__":
    import sys

    from longvila_jax.eval.cli import vniah_main

    sys.exit(vniah_main())
