"""VideoMME-style multiple-choice evaluation on the published annotation format.

    python -m longvila_jax.eval.videomme --model DIR --annotations FILE --videos DIR \\
        --frames 256 [--mesh configs/mesh/cpu8_r2u4.yaml] [--out DIR]

Annotations, either layout of the benchmark:

- the HF dataset ``lmms-lab/Video-MME`` (``videomme/test-*.parquet``, also accepted as a JSON
  list or JSONL of the same rows): ``video_id`` ("001"), ``duration`` (short / medium / long),
  ``domain``, ``sub_category``, ``url``, ``videoID`` (the YouTube id, the video file name),
  ``question_id`` ("001-1"), ``task_type``, ``question``, ``options`` (["A. ...", ...]),
  ``answer`` ("C"). Parquet needs ``pyarrow`` (not a project dependency).
- the official GitHub template (``evaluation/output_test_template.json``): a list of videos
  with ``video_id``, ``duration_category``, ``video_category``, ``video_subcategory`` and
  ``questions`` [{``question_id``, ``task_type``, ``question``, ``choices``, ``answer``}].

Videos are looked up as ``<videos>/<videoID>.{mp4,MP4,mkv}`` (as lmms-eval / VILA), then by
``video_id``. Frames: ``num_frames`` uniformly over the video (``data.video.decode_video``, the
LongVILA rule). Prompt: VILA's lmms-eval task (``llava/eval/lmms/tasks/videomme.py``), "Select
the best answer ... Respond with only the letter (A, B, C, or D) of the correct option." +
question + options + "The best answer is:", after the frames, in the training chat template.

Scoring: one forward per question; the prediction is the option letter whose token has the
highest logit at the first answer position (restricted to the letters the question offers).
Upstream generates up to 16 tokens greedily and regex-extracts the first A-D letter; the
unrestricted greedy first token is recorded too (``greedy``), so both readings are available.
Accuracy is reported per duration bucket and overall.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from longvila_jax.core.errors import InputError, brief
from longvila_jax.core.safe_load import load_json, parse_json
from longvila_jax.core.safe_paths import read_regular

DURATIONS = ("short", "medium", "long")
OPTION_PROMPT = (
    "Select the best answer to the following multiple-choice question based on the video. "
    "Respond with only the letter (A, B, C, or D) of the correct option."
)
POST_PROMPT = "The best answer is:"
_OPTION_RE = re.compile(r"^\s*([A-Z])[.)]\s*")
_VIDEO_SUFFIXES = (".mp4", ".MP4", ".mkv")


@dataclasses.dataclass(frozen=True)
class MCQuestion:
    """One multiple-choice question (fields named as in the HF dataset)."""

    question_id: str
    video_id: str
    videoID: str  # noqa: N815 -- the benchmark's field name
    duration: str
    question: str
    options: tuple[str, ...]
    answer: str
    task_type: str = ""
    domain: str = ""
    sub_category: str = ""

    @property
    def letters(self) -> tuple[str, ...]:
        """The option letters, read from the "A. ..." prefixes."""
        return tuple(_OPTION_RE.match(o).group(1) for o in self.options)


def _field(row: dict, names: Sequence[str], where: str, kind=str):
    for name in names:
        if name in row and row[name] is not None:
            value = row[name]
            if kind is str and isinstance(value, (int, float)):
                value = str(value)
            if not isinstance(value, kind):
                raise InputError(
                    f"{where}: field {name!r} must be {kind.__name__}, got {brief(value)}"
                )
            return value
    raise InputError(f"{where}: missing field {' / '.join(repr(n) for n in names)}")


def _question(row: dict, video: dict, where: str) -> MCQuestion:
    options = _field(row, ("options", "choices"), where, list)
    options = tuple(str(o) for o in options)
    if len(options) < 2:
        raise InputError(f"{where}: needs at least 2 options, got {brief(options)}")
    for o in options:
        if not _OPTION_RE.match(o):
            raise InputError(f"{where}: option {brief(o)} does not start with a letter like 'A. '")
    answer = _field(row, ("answer",), where).strip()
    q = MCQuestion(
        question_id=_field(row, ("question_id",), where),
        video_id=_field(video, ("video_id",), where),
        videoID=str(video.get("videoID") or video.get("video_id")),
        duration=_field(video, ("duration", "duration_category"), where).strip().lower(),
        question=_field(row, ("question",), where),
        options=options,
        answer=answer,
        task_type=str(row.get("task_type", "")),
        domain=str(video.get("domain", video.get("video_category", ""))),
        sub_category=str(video.get("sub_category", video.get("video_subcategory", ""))),
    )
    if len(set(q.letters)) != len(q.letters):
        raise InputError(f"{where}: repeated option letters {q.letters}")
    if answer not in q.letters:
        raise InputError(
            f"{where}: answer {brief(answer)} is not one of the option letters {q.letters}"
        )
    if q.duration not in DURATIONS:
        raise InputError(f"{where}: duration {brief(q.duration)} is not one of {DURATIONS}")
    return q


def parse_annotations(records: list, source: str = "annotations") -> list[MCQuestion]:
    """Questions from flat HF rows or the nested official template (detected per record).

    Raises:
      ValueError: naming the record and the field.
    """
    if not isinstance(records, list):
        raise InputError(f"{source}: expected a list of records, got {type(records).__name__}")
    out = []
    for i, rec in enumerate(records):
        where = f"{source}[{i}]"
        if not isinstance(rec, dict):
            raise InputError(f"{where}: expected an object, got {type(rec).__name__}")
        if "questions" in rec:
            qs = rec["questions"]
            if not isinstance(qs, list):
                raise InputError(f"{where}: field 'questions' must be a list")
            out += [_question(q, rec, f"{where}.questions[{j}]") for j, q in enumerate(qs)]
        else:
            out.append(_question(rec, rec, where))
    ids = [q.question_id for q in out]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise InputError(f"{source}: repeated question_id {dup[:5]}")
    return out


def load_annotations(path: str | Path) -> list[MCQuestion]:
    """Reads ``.parquet`` (needs pyarrow), ``.json`` or ``.jsonl`` annotations.

    JSON goes through the checked loader (``core.safe_load``: no duplicate keys, NaN or deep
    nesting) and the file must be a regular file (a FIFO is refused, not waited on).

    Raises:
      InputError: naming the file (and line) or the record and field.
    """
    path = Path(path)
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(
                f"{path}: reading parquet needs pyarrow (pip install pyarrow), or convert it "
                "to JSON lines first"
            ) from None
        records = pq.read_table(path).to_pylist()
    elif path.suffix == ".jsonl":
        raw = read_regular(path, "annotations", InputError)
        records = []
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                records.append(parse_json(line, f"{path}:{n}", InputError))
    else:
        records = load_json(path, "annotations", InputError, expect=None, max_bytes=None)
    return parse_annotations(records, str(path))


def question_text(q: MCQuestion) -> str:
    """VILA's VideoMME prompt (without subtitles) for one question."""
    return "\n".join([OPTION_PROMPT, q.question, *q.options, POST_PROMPT])


def find_video(video_dir: str | Path, q: MCQuestion) -> Path:
    """``<videoID>.mp4`` (or .MP4 / .mkv), falling back to ``<video_id>.*``."""
    for stem in dict.fromkeys((q.videoID, q.video_id)):
        if "/" in stem or "\\" in stem or "\x00" in stem or stem in (".", ".."):
            raise InputError(f"question {q.question_id}: video id {brief(stem)} is not a name")
        for suffix in _VIDEO_SUFFIXES:
            p = Path(video_dir) / f"{stem}{suffix}"
            if p.is_file():
                return p
    raise ValueError(f"question {q.question_id}: no video {q.videoID}.mp4 in {video_dir}")


def letter_token_ids(tokenizer, letters: Sequence[str]) -> dict[str, int]:
    """Token id of each option letter (each must be a single token)."""
    out = {}
    for letter in letters:
        ids = tokenizer(letter, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"tokenizer: option letter {letter!r} is not one token ({ids})")
        out[letter] = int(ids[0])
    return out


def accuracy_by_duration(records: Sequence[dict]) -> dict[str, dict]:
    """{bucket: {correct, total, accuracy}} for short / medium / long / overall.

    A bucket without questions has ``accuracy`` None.
    """
    out = {}
    for bucket in (*DURATIONS, "overall"):
        sel = [r for r in records if bucket == "overall" or r["duration"] == bucket]
        correct = sum(bool(r["correct"]) for r in sel)
        out[bucket] = {
            "correct": correct,
            "total": len(sel),
            "accuracy": correct / len(sel) if sel else None,
        }
    return out


def run_videomme(
    model,
    tokenizer,
    annotations: str | Path | Sequence[MCQuestion],
    video_dir: str | Path,
    num_frames: int,
    *,
    mesh=None,
    out_dir: str | Path | None = None,
    template: str | None = None,
    newline_after_frame: bool = True,
    length_bucket: int = 256,
    encode_batch: int = 32,
    limit: int | None = None,
) -> dict:
    """Runs the multiple-choice evaluation; writes ``results.json`` under ``out_dir``.

    Args:
      model: a ``LongVILA``; tokenizer: its fast tokenizer.
      annotations: annotation file (see the module docstring) or parsed questions.
      video_dir: folder of the videos.
      num_frames: frames per video, sampled uniformly.
      mesh: optional mesh for the sequence-parallel forward.
      out_dir: results folder (created), or None.
      template: chat template (default from the LLM architecture).
      newline_after_frame: ``"<image>\\n"`` per frame, as our training.
      length_bucket: sequences are padded to a multiple of this (fewer compilations).
      encode_batch: frames per vision-tower call.
      limit: evaluate only the first ``limit`` questions.

    Returns:
      ``{"accuracy": accuracy_by_duration(...), "questions": [...], ...}``; a video that
      cannot be decoded marks its questions wrong with an ``error``.
    """
    from longvila_jax.data.skips import SampleSkipped
    from longvila_jax.data.video import decode_video
    from longvila_jax.eval.forward import TeacherForcedScorer
    from longvila_jax.eval.vniah import prompt_ids, template_for
    from longvila_jax.models.vlm import expand_inputs

    t0 = time.perf_counter()
    cfg = model.cfg
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if not isinstance(annotations, (list, tuple)):
        annotations = load_annotations(annotations)
    questions = list(annotations)[:limit]
    template = template or template_for(cfg)
    scorer = TeacherForcedScorer(model, mesh, encode_batch=encode_batch)
    by_video: dict[str, list[MCQuestion]] = {}
    for q in questions:
        by_video.setdefault(q.videoID, []).append(q)
    records = []
    for qs in by_video.values():
        error = None
        try:
            path = find_video(video_dir, qs[0])
            frames = decode_video(path, cfg.vision.image_size, num_frames, min_frames=1)
            table = scorer.encode(frames)
        except SampleSkipped as e:
            error = str(e)
        for q in qs:
            rec = {
                "question_id": q.question_id,
                "video_id": q.video_id,
                "videoID": q.videoID,
                "duration": q.duration,
                "task_type": q.task_type,
                "answer": q.answer,
            }
            if error is not None:
                records.append({**rec, "prediction": "", "correct": False, "error": error})
                continue
            ids = prompt_ids(
                tokenizer,
                question_text(q),
                len(frames),
                template=template,
                image_token_id=cfg.image_token_id,
                newline_after_frame=newline_after_frame,
            )
            ex = expand_inputs(
                ids[None],
                num_frames=len(frames),
                image_token_id=cfg.image_token_id,
                tokens_per_frame=cfg.tokens_per_frame,
                vocab_size=cfg.llm.vocab_size,
            )
            t = ex.text_ids.shape[1]
            logits = scorer.logits_at(
                ex.text_ids,
                ex.visual_index,
                table,
                np.array([[t - 1]], np.int32),
                pad_to=-(-t // length_bucket) * length_bucket,
            )[0, 0]
            letters = letter_token_ids(tokenizer, q.letters)
            scores = {k: float(logits[v]) for k, v in letters.items()}
            pred = max(scores, key=scores.get)
            greedy = tokenizer.decode([int(logits.argmax())], skip_special_tokens=False)
            records.append(
                {
                    **rec,
                    "prediction": pred,
                    "correct": pred == q.answer,
                    "letter_logits": scores,
                    "greedy": greedy,
                }
            )
    results = {
        "num_frames": num_frames,
        "template": template,
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


if __name__ == "__main__":
    import sys

    from longvila_jax.eval.cli import videomme_main

    sys.exit(videomme_main())
