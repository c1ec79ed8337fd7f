"""VideoMME annotations: both published layouts parsed into :class:`MCQuestion`, the question
text of VILA's lmms-eval task, and where each question's video is.

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
``video_id``. Every file is read with the checked loaders (``core.safe_load``,
``core.safe_paths``): a bad file is an ``InputError`` naming the file, line or record and field.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

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
    parsed = MCQuestion(
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
    if len(set(parsed.letters)) != len(parsed.letters):
        raise InputError(f"{where}: repeated option letters {parsed.letters}")
    if answer not in parsed.letters:
        raise InputError(
            f"{where}: answer {brief(answer)} is not one of the option letters {parsed.letters}"
        )
    if parsed.duration not in DURATIONS:
        raise InputError(f"{where}: duration {brief(parsed.duration)} is not one of {DURATIONS}")
    return parsed


def parse_annotations(records: list, source: str = "annotations") -> list[MCQuestion]:
    """Questions from flat HF rows or the nested official template (detected per record).

    Raises:
      ValueError: naming the record and the field.
    """
    if not isinstance(records, list):
        raise InputError(f"{source}: expected a list of records, got {type(records).__name__}")
    out = []
    for i, record in enumerate(records):
        where = f"{source}[{i}]"
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected an object, got {type(record).__name__}")
        if "questions" in record:
            questions = record["questions"]
            if not isinstance(questions, list):
                raise InputError(f"{where}: field 'questions' must be a list")
            out += [
                _question(row, record, f"{where}.questions[{j}]") for j, row in enumerate(questions)
            ]
        else:
            out.append(_question(record, record, where))
    ids = [question.question_id for question in out]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise InputError(f"{source}: repeated question_id {repeated[:5]}")
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
        try:  # an optional dependency, needed for this file type only
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


def question_text(question: MCQuestion) -> str:
    """VILA's VideoMME prompt (without subtitles) for one question."""
    return "\n".join([OPTION_PROMPT, question.question, *question.options, POST_PROMPT])


def find_video(video_dir: str | Path, question: MCQuestion) -> Path:
    """``<videoID>.mp4`` (or .MP4 / .mkv), falling back to ``<video_id>.*``."""
    for stem in dict.fromkeys((question.videoID, question.video_id)):
        if "/" in stem or "\\" in stem or "\x00" in stem or stem in (".", ".."):
            raise InputError(
                f"question {question.question_id}: video id {brief(stem)} is not a name"
            )
        for suffix in _VIDEO_SUFFIXES:
            candidate = Path(video_dir) / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    raise ValueError(
        f"question {question.question_id}: no video {question.videoID}.mp4 in {video_dir}"
    )


__all__ = [
    "DURATIONS",
    "OPTION_PROMPT",
    "POST_PROMPT",
    "MCQuestion",
    "find_video",
    "load_annotations",
    "parse_annotations",
    "question_text",
]
