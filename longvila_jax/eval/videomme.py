"""VideoMME-style multiple-choice evaluation on the published annotation format.

    python -m longvila_jax.eval.videomme --model DIR --annotations FILE --videos DIR \\
        --frames 256 [--mesh configs/mesh/cpu8_r2u4.yaml] [--out DIR]

Annotations: either published layout (HF rows or the official template, parsed by
``eval.videomme_annotations``); videos are looked up as ``<videos>/<videoID>.{mp4,MP4,mkv}``
(as lmms-eval / VILA), then by ``video_id``. Frames: ``num_frames`` uniformly over the video
(``data.video.decode_video``, the LongVILA rule). Prompt: VILA's lmms-eval task
(``llava/eval/lmms/tasks/videomme.py``), "Select the best answer ... Respond with only the
letter (A, B, C, or D) of the correct option." + question + options + "The best answer is:",
after the frames, in the training chat template (``infer.prompts``).

Scoring: one forward per question; the prediction is the option letter whose token has the
highest logit at the first answer position (restricted to the letters the question offers).
Upstream generates up to 16 tokens greedily and regex-extracts the first A-D letter; the
unrestricted greedy first token is recorded too (``greedy``), so both readings are available.
Accuracy is reported per duration bucket and overall.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from longvila_jax.data.skips import SampleSkipped
from longvila_jax.data.video import decode_video
from longvila_jax.eval.cli import add_common_arguments, run_command
from longvila_jax.eval.videomme_annotations import (
    DURATIONS,
    MCQuestion,
    find_video,
    load_annotations,
    question_text,
)
from longvila_jax.infer.chat_format import ChatFormat, chat_format
from longvila_jax.infer.prompts import prompt_ids, single_token_id
from longvila_jax.infer.scoring import TeacherForcedScorer
from longvila_jax.models.vlm import expand_prompts


def letter_token_ids(tokenizer, letters: Sequence[str]) -> dict[str, int]:
    """Token id of each option letter (each must be a single token)."""
    return {
        letter: single_token_id(tokenizer, letter, "tokenizer: option letter") for letter in letters
    }


def accuracy_by_duration(records: Sequence[dict]) -> dict[str, dict]:
    """{bucket: {correct, total, accuracy}} for short / medium / long / overall.

    A bucket without questions has ``accuracy`` None.
    """
    out = {}
    for bucket in (*DURATIONS, "overall"):
        selected = [r for r in records if bucket == "overall" or r["duration"] == bucket]
        correct = sum(bool(r["correct"]) for r in selected)
        out[bucket] = {
            "correct": correct,
            "total": len(selected),
            "accuracy": correct / len(selected) if selected else None,
        }
    return out


def _letter_scores(
    scorer: TeacherForcedScorer,
    tokenizer,
    question: MCQuestion,
    table,
    num_frames: int,
    template: str | ChatFormat,
    newline_after_frame: bool,
    length_bucket: int,
) -> dict:
    """One question's prediction: the option letter with the highest logit right after the
    prompt (the first answer position), plus the unrestricted greedy token."""
    cfg = scorer.cfg
    ids = prompt_ids(
        tokenizer,
        question_text(question),
        num_frames,
        template=template,
        image_token_id=cfg.image_token_id,
        newline_after_frame=newline_after_frame,
    )
    expanded = expand_prompts(
        ids[None],
        num_frames=num_frames,
        image_token_id=cfg.image_token_id,
        tokens_per_frame=cfg.tokens_per_frame,
        vocab_size=cfg.llm.vocab_size,
    )
    length = expanded.text_ids.shape[1]
    logits = scorer.logits_at(
        expanded.text_ids,
        expanded.visual_index,
        table,
        np.array([[length - 1]], np.int32),  # the prompt's last position predicts the answer
        pad_to=-(-length // length_bucket) * length_bucket,
    )[0, 0]
    letters = letter_token_ids(tokenizer, question.letters)
    scores = {letter: float(logits[i]) for letter, i in letters.items()}
    prediction = max(scores, key=scores.get)
    return {
        "prediction": prediction,
        "correct": prediction == question.answer,
        "letter_logits": scores,
        "greedy": tokenizer.decode([int(logits.argmax())], skip_special_tokens=False),
    }


def run_videomme(
    model,
    tokenizer,
    annotations: str | Path | Sequence[MCQuestion],
    video_dir: str | Path,
    num_frames: int,
    *,
    mesh=None,
    out_dir: str | Path | None = None,
    template: str | ChatFormat | None = None,
    newline_after_frame: bool = True,
    length_bucket: int = 256,
    encode_batch: int = 32,
    limit: int | None = None,
) -> dict:
    """Runs the multiple-choice evaluation; writes ``results.json`` under ``out_dir``.

    Args:
      model: a ``LongVILA``; tokenizer: its fast tokenizer.
      annotations: annotation file (``eval.videomme_annotations``) or parsed questions.
      video_dir: folder of the videos.
      num_frames: frames per video, sampled uniformly.
      mesh: optional mesh for the sequence-parallel forward.
      out_dir: results folder (created), or None.
      template: a built-in template name or a ``ChatFormat`` (default: the tokenizer's own
        template, else the built-in one of the LLM architecture; ``infer.chat_format``).
      newline_after_frame: ``"<image>\\n"`` per frame, as our training.
      length_bucket: sequences are padded to a multiple of this (fewer compilations).
      encode_batch: frames per vision-tower call.
      limit: evaluate only the first ``limit`` questions.

    Returns:
      ``{"accuracy": accuracy_by_duration(...), "questions": [...], ...}``; a video that
      cannot be decoded marks its questions wrong with an ``error``.
    """
    t0 = time.perf_counter()
    cfg = model.cfg
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if not isinstance(annotations, (list, tuple)):
        annotations = load_annotations(annotations)
    questions = list(annotations)[:limit]
    template = template or chat_format(tokenizer, cfg.llm.arch)
    scorer = TeacherForcedScorer(model, mesh, encode_batch=encode_batch)
    by_video: dict[str, list[MCQuestion]] = {}
    for question in questions:
        by_video.setdefault(question.videoID, []).append(question)
    records = []
    for video_questions in by_video.values():
        # Each video is decoded and encoded once for all of its questions.
        error = None
        try:
            path = find_video(video_dir, video_questions[0])
            frames = decode_video(path, cfg.vision.image_size, num_frames, min_frames=1)
            table = scorer.encode(frames)
        except SampleSkipped as e:
            error = str(e)
        for question in video_questions:
            record = {
                "question_id": question.question_id,
                "video_id": question.video_id,
                "videoID": question.videoID,
                "duration": question.duration,
                "task_type": question.task_type,
                "answer": question.answer,
            }
            if error is not None:
                records.append({**record, "prediction": "", "correct": False, "error": error})
                continue
            scored = _letter_scores(
                scorer,
                tokenizer,
                question,
                table,
                len(frames),
                template,
                newline_after_frame,
                length_bucket,
            )
            records.append({**record, **scored})
    results = {
        "num_frames": num_frames,
        "template": template if isinstance(template, str) else template.name,
        "newline_after_frame": newline_after_frame,
        "scoring": "argmax of the option-letter logits at the first answer position",
        "mesh": None if mesh is None else {k: int(v) for k, v in mesh.shape.items()},
        "accuracy": accuracy_by_duration(records),
        "errors": sum("error" in r for r in records),
        "questions": records,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    """``python -m longvila_jax.eval.videomme``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m longvila_jax.eval.videomme", description="VideoMME-style evaluation"
    )
    add_common_arguments(parser)
    parser.add_argument("--annotations", required=True, help=".parquet / .json / .jsonl")
    parser.add_argument("--videos", required=True, help="folder with <videoID>.mp4")
    parser.add_argument("--frames", required=True, type=int, help="frames per video (uniform)")
    parser.add_argument("--out", default="videomme_out", help="results folder")
    parser.add_argument("--limit", type=int, help="only the first N questions")
    args = parser.parse_args(argv)

    def evaluate(model, tokenizer, **options) -> str:
        results = run_videomme(
            model, tokenizer, args.annotations, args.videos, args.frames,
            out_dir=args.out, limit=args.limit, **options,
        )  # fmt: skip
        parts = [
            f"{bucket} {v['accuracy']:.3f} ({v['correct']}/{v['total']})"
            for bucket, v in results["accuracy"].items()
            if v["total"]
        ]
        return "VideoMME accuracy: " + ", ".join(parts) + f"; wrote {args.out}"

    return run_command(args, evaluate)


if __name__ == "__main__":
    sys.exit(main())
