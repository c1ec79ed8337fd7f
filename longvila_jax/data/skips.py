"""Bad-input accounting: skip reasons, per-reason counters and the skip-rate guard.

A bad sample is never replaced (the PyTorch original substitutes black frames or another random
sample): the per-sample transform raises ``SampleSkipped``, the pipeline turns it into a skip
marker, and the packing stage in the main process counts it, logs its id and checks the rate over
a sliding window of samples. Counting in the main process, after the worker processes, keeps the
counters part of the exact, resumable iterator state.

Every record may be hostile, so the transform isolates each sample: an unexpected exception
while turning one record into a sample becomes a skip too, with the reason ``error:<Type>``
(``error_reason``), counted and shown like the named reasons. ``DataConfig.fail_fast`` turns
every skip into a ``SampleError`` naming the sample, for debugging.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Mapping
from typing import Any

from longvila_jax.core.errors import MAX_MESSAGE, InputError

log = logging.getLogger(__name__)

# Every reason a sample can be skipped for; the check CLI and tests use these names.
REASONS = (
    # manifest entry is not a JSON object, is hostile JSON (nested over 64 levels, duplicate
    # keys, NaN), lacks required fields, or holds out-of-range values (a token id of 2**64)
    "bad_record",
    "bad_text_encoding",  # line is not valid UTF-8, or a string is not (a lone surrogate)
    "empty_text",  # empty question, answer, caption or document
    "path_outside_root",  # media path escapes the data root
    "missing_file",
    "not_regular_file",  # media path is a FIFO, device, socket or directory (reading could hang)
    "empty_file",  # zero-byte media file
    "unreadable_video",  # container cannot be opened (truncated, no moov atom, not a video)
    "no_video_stream",
    "bad_fps",  # fps is 0, negative or NaN where sampling needs it
    "no_frames",  # zero decodable frames
    "frame_count_mismatch",  # metadata promises more frames than the stream holds
    "too_few_frames",  # fewer than min_video_frames (e.g. a single frame)
    "decode_timeout",  # the decoder hung past decode_timeout_s and was killed
    "decoder_crash",  # the sandboxed decoder process died
    "corrupt_image",
    "image_too_large",  # Pillow's decompression-bomb guard
    "placeholder_mismatch",  # number of <image> placeholders != number of media
    "too_long",  # longer than the packed row after visual-token expansion
    "no_supervised_tokens",
)
# Prefix of the reason of an unexpected exception in the transform: ``error:TypeError``.
ERROR_PREFIX = "error:"


def error_reason(exc: BaseException) -> str:
    """The skip reason for an unexpected exception: ``error:<exception type name>``."""
    return ERROR_PREFIX + type(exc).__name__


def is_reason(reason: object) -> bool:
    """Whether ``reason`` is one of ``REASONS`` or an ``error:<Type>`` reason."""
    return isinstance(reason, str) and (
        reason in REASONS or (reason.startswith(ERROR_PREFIX) and len(reason) > len(ERROR_PREFIX))
    )


def bound(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` cut to ``limit`` characters: details quote record content, which may be huge."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


class SampleSkipped(Exception):
    """A sample is bad and must be skipped; ``reason`` satisfies ``is_reason``."""

    def __init__(self, reason: str, detail: str = ""):
        if not is_reason(reason):
            raise ValueError(f"unknown skip reason {reason!r}")
        self.reason = reason
        self.detail = bound(detail)
        super().__init__(f"{reason}: {self.detail}" if detail else reason)

    def __reduce__(self):  # the default would call __init__ with the formatted message
        return (type(self), (self.reason, self.detail))


class SampleError(InputError):
    """A bad sample with ``DataConfig.fail_fast`` set: names the sample id and the skip reason.

    The exception that made the sample bad is chained as ``__cause__`` (in this process; a
    grain worker process sends the error without its chain).
    """

    def __init__(self, sample_id: str, reason: str, detail: str = ""):
        self.sample_id = sample_id
        self.reason = reason
        self.detail = bound(detail)
        text = f"sample {sample_id}: {reason}" + (f" ({self.detail})" if detail else "")
        super().__init__(f"{text}; fail_fast is set, so bad samples stop the run")

    def __reduce__(self):  # picklable across grain worker processes
        return (type(self), (self.sample_id, self.reason, self.detail))


class SkipRateExceeded(InputError, RuntimeError):
    """Too many samples were skipped in the last window; the data set is likely broken."""


class TooLongSample(InputError):
    """A sample exceeds the row length and ``too_long_policy`` is ``error``."""


def skip_marker(reason: str, sample_id: str, detail: str = "") -> dict[str, Any]:
    """The element a per-sample transform yields instead of a sample (``detail`` bounded)."""
    return {"skip_reason": reason, "sample_id": sample_id, "detail": bound(detail)}


def is_skip(element: Mapping[str, Any]) -> bool:
    return "skip_reason" in element


class SkipCounter:
    """Per-reason skip counts plus a sliding-window skip-rate guard.

    Args:
      window: number of most recent samples the rate is computed over.
      max_rate: abort (``SkipRateExceeded``) when skips / window exceeds this once the window is
        full; 1.0 disables the guard.
    """

    def __init__(self, window: int, max_rate: float):
        self.window = window
        self.max_rate = max_rate
        self.counts: collections.Counter[str] = collections.Counter()
        self.seen = 0
        # Outcomes of the last `window` samples (True = skipped), oldest first.
        self._recent: collections.deque[bool] = collections.deque(maxlen=window)

    def ok(self) -> None:
        self.seen += 1
        self._recent.append(False)

    def skip(self, reason: str, sample_id: str, detail: str = "") -> None:
        self.seen += 1
        self.counts[reason] += 1
        self._recent.append(True)
        log.warning("skipped sample %s: %s %s", sample_id, reason, detail)
        self._check()

    def _check(self) -> None:
        if len(self._recent) < self.window:
            return
        rate = sum(self._recent) / self.window
        if rate > self.max_rate:
            top = ", ".join(f"{r}={n}" for r, n in self.counts.most_common(5))
            raise SkipRateExceeded(
                f"skipped {rate:.1%} of the last {self.window} samples, above max_skip_rate "
                f"{self.max_rate:.1%}; top reasons so far: {top}. Fix the data or raise "
                "max_skip_rate."
            )

    def get_state(self) -> dict[str, Any]:
        return {
            "counts": dict(self.counts),
            "seen": self.seen,
            "recent": "".join("1" if s else "0" for s in self._recent),
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.counts = collections.Counter({str(k): int(v) for k, v in state["counts"].items()})
        self.seen = int(state["seen"])
        self._recent = collections.deque((c == "1" for c in state["recent"]), maxlen=self.window)


__all__ = [
    "ERROR_PREFIX",
    "REASONS",
    "SampleError",
    "SampleSkipped",
    "SkipCounter",
    "SkipRateExceeded",
    "TooLongSample",
    "bound",
    "error_reason",
    "is_reason",
    "is_skip",
    "skip_marker",
]
