"""What every chat backend takes and returns: the data engine's and the caption benchmark's
one interface to a model, whether it runs in this process, behind an OpenAI-compatible
endpoint, or is an oracle that reads the synthetic corpus' ground truth.

A tool hands a backend a batch of :class:`ChatRequest` and gets back, in the same order, one
:class:`ChatReply` or one :class:`BackendError` per request: a failed request never costs the
others in its batch, and the caller decides what a failure means (retry later, count, drop).
Every backend keeps :class:`Usage` counters (requests, failures, retries, tokens) that the
tools' summaries report per backend.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from typing import Protocol

ROLES = ("captioner", "writer", "judge")


@dataclasses.dataclass(frozen=True)
class ClipMedia:
    """A time range of a video file, sampled as ``num_frames`` frames spread over it.

    Attributes:
      path: the video file.
      start_s, end_s: the range in seconds, ``0 <= start_s < end_s``.
      num_frames: frames to sample uniformly within the range (``data.clips.clip_indices``).
    """

    path: str
    start_s: float
    end_s: float
    num_frames: int


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """One chat completion: an optional system message, one user message, optional media.

    Attributes:
      key: the work item it belongs to (``video/clip-3``), named in errors and logs.
      prompt: the user message's text (no media placeholders: the backend places the frames
        before the text, as the training data does).
      system: the system message, or None for the backend's default.
      media: the clip whose frames go with the user message, or None (text only).
      max_tokens: the answer's token budget.
      temperature: 0 is greedy; a retry of a bad generation may raise it.
      seed: sampling seed (ignored when greedy).
    """

    key: str
    prompt: str
    system: str | None = None
    media: ClipMedia | None = None
    max_tokens: int = 512
    temperature: float = 0.0
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class ChatReply:
    """A backend's answer to one request.

    Attributes:
      text: the assistant message's text.
      model: the model that answered (an endpoint's ``model`` field, a checkpoint's directory
        name, ``oracle-...``), recorded in the provenance of what is built from the answer.
      prompt_tokens, completion_tokens: as the backend counted them (0 when unknown).
      attempts: transport attempts it took (1 = no retry).
    """

    text: str
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 1


class BackendError(Exception):
    """One request failed for good (after the backend's own retries); the message names the
    request's key and the cause. ``kind`` is a short reason for the summaries' counters
    (``timeout``, ``http_500``, ``malformed_response``, ``media``, ...)."""

    def __init__(self, key: str, kind: str, detail: str):
        super().__init__(f"{key}: {kind}: {detail}")
        self.key, self.kind, self.detail = key, kind, detail


@dataclasses.dataclass
class Usage:
    """Counters of one backend (thread-safe updates through :meth:`add`)."""

    requests: int = 0
    failures: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    _lock: threading.Lock = dataclasses.field(
        default_factory=threading.Lock, repr=False, compare=False
    )

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {
                f.name: getattr(self, f.name)
                for f in dataclasses.fields(self)
                if not f.name.startswith("_")
            }


class ChatBackend(Protocol):
    """A model that answers chat requests (see the module docstring).

    Attributes:
      name: the spec it was opened from, without secrets (``openai:http://host/v1#model``,
        ``local:/ckpt``, ``oracle``).
      usage: its counters.
    """

    name: str
    usage: Usage

    def chat(self, requests: Sequence[ChatRequest]) -> list[ChatReply | BackendError]:
        """Answers a batch; one reply or error per request, in order. Never raises for one
        request's failure (only for a backend that cannot work at all)."""
        ...

    def close(self) -> None:
        """Releases threads, connections, decoder children and device memory."""
        ...


__all__ = [
    "ROLES",
    "BackendError",
    "ChatBackend",
    "ChatReply",
    "ChatRequest",
    "ClipMedia",
    "Usage",
]
