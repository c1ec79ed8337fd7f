"""Strict checks of a writer LLM's answer: its JSON form, then every QA pair against the clips.

The writer must answer one JSON object ``{"summary": str, "qa": [{"category", "question",
"answer", "clips"}, ...]}`` (``configs/data/prompts/writer_v1.yaml``). An answer that is not
that object as a whole (not JSON, extra text around it, a missing summary, ``qa`` not a list)
is a bad generation: :func:`parse_answer` raises :class:`BadAnswer` and the caller retries.
Inside a good object, each QA pair is checked on its own and a bad one is dropped with a
reason (:data:`DROP_REASONS`), so one hallucinated timestamp does not cost the other pairs:

- the fields are present, strings are non-empty and within their length limits, the
  category is one of :data:`CATEGORIES`, ``clips`` are distinct indices of existing clips;
- a ``needle`` question cites exactly one clip;
- a ``counting`` answer starts with a number written in digits;
- every timestamp a question or answer names lies inside one of the cited clips;
- a question already asked about this video (case and spacing ignored) is a duplicate.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
from collections.abc import Sequence
from typing import Any

from longvila_jax.core.errors import brief
from longvila_jax.core.safe_load import parse_json
from longvila_jax.data.clips import TIMESTAMP_RE, Clip, parse_timestamp

CATEGORIES = (
    "summary",
    "temporal_order",
    "counting",
    "attributes",
    "actions",
    "causal",
    "needle",
)
DROP_REASONS = (
    "bad_item",  # not an object, missing or extra fields, wrong types
    "bad_category",
    "empty_text",
    "too_long",
    "bad_clips",  # not a non-empty list of distinct existing clip indices
    "needle_not_one_clip",
    "count_not_a_number",
    "timestamp_outside_clips",  # a named moment is not inside a cited clip (or not a time)
    "duplicate",
    "over_limit",  # beyond the prompt's max_qa
)
MAX_QUESTION, MAX_ANSWER, MAX_SUMMARY = 400, 2000, 4000
_FENCE = re.compile(r"^```(?:json)?\s*\n(.*)\n```$", re.DOTALL)
_COUNT = re.compile(r"^\d+\b")


class BadAnswer(ValueError):
    """The writer's answer is not the JSON object asked for; ``reason`` names what is wrong."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclasses.dataclass(frozen=True)
class QA:
    """One checked question-answer pair; ``clips`` sorted."""

    category: str
    question: str
    answer: str
    clips: tuple[int, ...]


@dataclasses.dataclass
class Checked:
    """A parsed answer: the summary, the pairs kept and the dropped ones counted per reason."""

    summary: str
    qa: list[QA]
    dropped: collections.Counter


def parse_answer(text: str) -> dict[str, Any]:
    """The writer's JSON object (a ```json fence around it is accepted, nothing else).

    Raises:
      BadAnswer: ``not_json``, ``not_an_object``, ``missing_summary``, ``bad_summary``,
        ``missing_qa`` or ``bad_qa``.
    """
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    try:
        obj = parse_json(body, "writer answer", ValueError, max_depth=8)
    except ValueError as e:
        raise BadAnswer("not_json", str(e)) from None
    if not isinstance(obj, dict):
        raise BadAnswer("not_an_object", f"got {type(obj).__name__}")
    if "summary" not in obj:
        raise BadAnswer("missing_summary", "no summary key")
    summary = obj["summary"]
    if not isinstance(summary, str) or not summary.strip() or len(summary) > MAX_SUMMARY:
        raise BadAnswer("bad_summary", f"summary must be a string of 1-{MAX_SUMMARY} characters")
    if "qa" not in obj:
        raise BadAnswer("missing_qa", "no qa key")
    if not isinstance(obj["qa"], list):
        raise BadAnswer("bad_qa", f"qa must be a list, got {type(obj['qa']).__name__}")
    return obj


def _timestamps_inside(text: str, cited: Sequence[Clip]) -> bool:
    for match in TIMESTAMP_RE.finditer(text):
        try:
            t = parse_timestamp(match.group(1))
        except ValueError:
            return False
        # Timestamps are written floored to whole seconds, so a clip [a, b) holds floor(a)..b.
        if not any(int(c.start_s) <= t <= c.end_s for c in cited):
            return False
    return True


def check_item(item: Any, clips: Sequence[Clip]) -> QA | str:
    """One QA pair checked against the video's clips: a :class:`QA`, or a drop reason."""
    fields = {"category", "question", "answer", "clips"}
    if not isinstance(item, dict) or set(item) != fields:
        return "bad_item"
    category, question, answer, cited = (
        item[k] for k in ("category", "question", "answer", "clips")
    )
    if not all(isinstance(v, str) for v in (category, question, answer)):
        return "bad_item"
    if category not in CATEGORIES:
        return "bad_category"
    question, answer = question.strip(), answer.strip()
    if not question or not answer:
        return "empty_text"
    if len(question) > MAX_QUESTION or len(answer) > MAX_ANSWER:
        return "too_long"
    if (
        not isinstance(cited, list)
        or not cited
        or not all(isinstance(c, int) and not isinstance(c, bool) for c in cited)
        or len(set(cited)) != len(cited)
        or not all(0 <= c < len(clips) for c in cited)
    ):
        return "bad_clips"
    if category == "needle" and len(cited) != 1:
        return "needle_not_one_clip"
    if category == "counting" and not _COUNT.match(answer):
        return "count_not_a_number"
    spans = [clips[c] for c in cited]
    if not (_timestamps_inside(question, spans) and _timestamps_inside(answer, spans)):
        return "timestamp_outside_clips"
    return QA(category, question, answer, tuple(sorted(cited)))


def _norm(question: str) -> str:
    return " ".join(question.lower().split())


def check_answer(text: str, clips: Sequence[Clip], max_qa: int) -> Checked:
    """Parses the writer's answer and checks every pair (module docstring).

    Args:
      text: the writer's raw answer.
      clips: the video's clips, whose indices the pairs cite.
      max_qa: pairs kept at most (later ones are dropped as ``over_limit``).

    Raises:
      BadAnswer: the answer as a whole is unusable (:func:`parse_answer`).
    """
    obj = parse_answer(text)
    kept: list[QA] = []
    seen: set[str] = set()
    dropped: collections.Counter[str] = collections.Counter()
    for item in obj["qa"]:
        result = check_item(item, clips)
        if isinstance(result, QA) and _norm(result.question) in seen:
            result = "duplicate"
        if isinstance(result, QA) and len(kept) >= max_qa:
            result = "over_limit"
        if isinstance(result, str):
            dropped[result] += 1
            continue
        seen.add(_norm(result.question))
        kept.append(result)
    return Checked(summary=obj["summary"].strip(), qa=kept, dropped=dropped)


def describe(item: Any) -> str:
    """A bounded rendering of a dropped item for logs."""
    return brief(json.dumps(item, ensure_ascii=False) if isinstance(item, dict) else item)


__all__ = [
    "CATEGORIES",
    "DROP_REASONS",
    "QA",
    "BadAnswer",
    "Checked",
    "check_answer",
    "check_item",
    "parse_answer",
]
