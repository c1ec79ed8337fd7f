"""Held-out question accuracy: teacher-forced exact match, preprocessed exactly as in training.

Each record of a dataset of a :class:`~longvila_jax.config.DataConfig` (for the demo, the
synthetic corpus's ``needle_eval.jsonl``) goes through the training pipeline's own
:class:`~longvila_jax.data.samples.SampleProcessor` (same frame sampling, chat template and
tokenisation as the stage that trained the model), then through one forward pass of the model
on one device (``infer.scoring.TeacherForcedScorer``, the scorer of V-NIAH and of
``Generator.teacher_forced``). A question counts as answered when the argmax at every position
of the reference answer's tokens (the first assistant reply) is the reference token: the
teacher-forced exact match of V-NIAH.
Samples the pipeline skips are counted by reason and never replaced.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from longvila_jax.config.data import DataConfig
from longvila_jax.data.samples import SampleProcessor
from longvila_jax.data.skips import is_skip
from longvila_jax.data.sources import ManifestSource, parse_record
from longvila_jax.infer.scoring import TeacherForcedScorer


def _first_reply(record: dict) -> str:
    for turn in record.get("conversations", []):
        if turn.get("from") == "gpt":
            return str(turn["value"])
    raise ValueError(f"record {record.get('id')!r}: no assistant reply to score")


def answer_positions(input_ids: np.ndarray, supervised: np.ndarray, answer: np.ndarray,
                     image_token_id: int, tokens_per_frame: int) -> np.ndarray:  # fmt: skip
    """Expanded positions whose next-token logits predict the answer's tokens.

    Args:
      input_ids: int [T] text ids with one placeholder per frame.
      supervised: bool [T] training targets (the assistant turns).
      answer: int [K] token ids of the reference answer; the first K supervised tokens must be
        exactly these.
      image_token_id, tokens_per_frame: the model's placeholder id and visual tokens per frame.

    Returns:
      int32 [K] positions p of the expanded sequence; logits at p predict answer token k.

    Raises:
      ValueError: the supervised tokens do not start with the answer.
    """
    targets = np.flatnonzero(supervised)[: len(answer)]
    if len(targets) < len(answer) or not np.array_equal(input_ids[targets], answer):
        raise ValueError(
            f"the supervised tokens {input_ids[targets].tolist()} do not start with the "
            f"answer's tokens {answer.tolist()}"
        )
    # A placeholder at text index j widens the sequence by tokens_per_frame - 1 after j.
    shift = np.cumsum(input_ids == image_token_id) * (tokens_per_frame - 1)
    expanded = targets + np.concatenate([[0], shift[:-1]])[targets]
    return (expanded - 1).astype(np.int32)


def heldout_accuracy(model, data: DataConfig, dataset: str, *, limit: int | None = None) -> dict:
    """Teacher-forced exact-match accuracy of ``model`` on one dataset of ``data``.

    Args:
      model: a ``LongVILA`` whose config matches ``data`` (image size, tokens per frame).
      data: the data config (root, tokenizer, template, frames per video...).
      dataset: name of the dataset of ``data`` to score (e.g. ``needle_eval``).
      limit: score only the first ``limit`` records.

    Returns:
      ``{"dataset", "accuracy", "correct", "scored", "skipped": {reason: n}, "results": [...],
      "seconds"}``; ``results`` holds per record the id, answer, prediction and answer
      log-probability.
    """
    specs = {d.name: d for d in data.datasets}
    if dataset not in specs:
        raise ValueError(f"dataset {dataset!r} is not in the data config ({sorted(specs)})")
    cfg = model.cfg
    if (data.image_size, data.tokens_per_frame) != (cfg.vision.image_size, cfg.tokens_per_frame):
        raise ValueError(
            f"data image_size/tokens_per_frame {data.image_size}/{data.tokens_per_frame} do not "
            f"match the model's {cfg.vision.image_size}/{cfg.tokens_per_frame}"
        )
    t0 = time.perf_counter()
    spec = specs[dataset]
    processor = SampleProcessor(data)
    tokenizer = processor.tokenizer
    scorer = TeacherForcedScorer(model)  # one device, dense attention
    source = ManifestSource(Path(data.root) / spec.manifest, spec.name)
    n = len(source) if limit is None else min(limit, len(source))
    results, skipped = [], {}
    for i in range(n):
        element = source[i]
        sample = processor(element)
        if is_skip(sample):
            skipped[sample["skip_reason"]] = skipped.get(sample["skip_reason"], 0) + 1
            continue
        answer = _first_reply(parse_record(element)).strip()
        answer_ids = np.asarray(tokenizer(answer, add_special_tokens=False)["input_ids"], np.int32)
        ids = np.asarray(sample["input_ids"], np.int32)
        # The sample holds the whole conversation (answer and end token included), so the
        # answer is read where the training labels put it, not at the end of the row.
        query = answer_positions(
            ids, sample["supervised"], answer_ids, cfg.image_token_id, cfg.tokens_per_frame
        )
        scored = scorer.score(ids, sample["frames"], answer_ids, query=query)
        results.append(
            {
                "id": sample["sample_id"],
                "answer": answer,
                "prediction": tokenizer.decode(scored.predicted_ids.tolist()),
                "exact": scored.exact_match,
                "answer_logprob": float(scored.logprobs.sum()),
            }
        )
    correct = sum(r["exact"] for r in results)
    return {
        "dataset": dataset,
        "accuracy": correct / len(results) if results else 0.0,
        "correct": correct,
        "scored": len(results),
        "skipped": skipped,
        "results": results,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def with_dataset(data: DataConfig, name: str, manifest: str, kind: str = "video") -> DataConfig:
    """``data`` with one extra dataset (e.g. the held-out manifest next to the training one)."""
    spec = dataclasses.replace(data.datasets[0], name=name, manifest=manifest, kind=kind)
    return dataclasses.replace(data, datasets=(*data.datasets, spec))


__all__ = ["answer_positions", "heldout_accuracy", "with_dataset"]
