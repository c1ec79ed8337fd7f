"""The server's limits: what one request may ask for and how much work the server holds.

Every limit is a flag of ``python -m longvila_jax.serve`` (the field name with dashes,
``--max-frames 128``); the defaults suit one model on one host. A request over a limit is
refused with a 4xx naming the field before any decoding or compilation; the queue limits give
429 (``serve.scheduler``).
"""

from __future__ import annotations

import argparse
import dataclasses

MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-request and server-wide limits (see the module docstring).

    Attributes:
      max_body_bytes: the HTTP request body (JSON with base64 media inside).
      max_media_bytes: one decoded media item (a data URL's bytes or a file under the root).
      max_media_items: image and video parts of one request.
      max_frames: frames of one request, all media together (each image is one frame).
      max_prompt_tokens: the prompt after visual-token expansion; 0 = the model's context.
      max_new_tokens: the largest ``max_tokens`` a request may ask for.
      default_new_tokens: ``max_tokens`` when a request gives none (the CLI's default).
      timeout_s: a request's wall time from admission (decode, queue, generation).
      decode_timeout_s: one media item's decode in the sandbox (a hung decoder is killed).
      max_queue: admitted requests waiting for media decoding or for the model; one more
        gets 429.
      max_batch: greedy requests decoded together in one batch (1 = no batching).
      decode_workers: sandboxed decoder processes (media decode in parallel with the model).
      drain_timeout_s: how long SIGTERM waits for in-flight requests before cancelling them.
    """

    max_body_bytes: int = 64 * MiB
    max_media_bytes: int = 32 * MiB
    max_media_items: int = 16
    max_frames: int = 256
    max_prompt_tokens: int = 0
    max_new_tokens: int = 1024
    default_new_tokens: int = 128
    timeout_s: float = 600.0
    decode_timeout_s: float = 60.0
    max_queue: int = 32
    max_batch: int = 8
    decode_workers: int = 2
    drain_timeout_s: float = 60.0

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            floor = 0 if field.name == "max_prompt_tokens" else 1
            if not value >= floor:
                raise ValueError(f"--{field.name.replace('_', '-')} must be >= {floor}: {value}")
        if self.default_new_tokens > self.max_new_tokens:
            raise ValueError("--default-new-tokens must be <= --max-new-tokens")

    def for_context(self, context: int) -> Limits:
        """These limits with ``max_prompt_tokens`` resolved against the model's context."""
        cap = self.max_prompt_tokens or context
        return dataclasses.replace(self, max_prompt_tokens=min(cap, context))


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Adds one ``--field-name`` flag per :class:`Limits` field, defaulting to its default."""
    group = parser.add_argument_group("limits")
    for field in dataclasses.fields(Limits):
        kind = float if field.type in ("float", float) else int
        group.add_argument(
            "--" + field.name.replace("_", "-"),
            type=kind,
            default=field.default,
            metavar="N",
            help=f"default {field.default}",
        )


def from_args(args: argparse.Namespace) -> Limits:
    """The :class:`Limits` of parsed flags (``ValueError`` names a bad one)."""
    return Limits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Limits)})


__all__ = ["Limits", "MiB", "add_flags", "from_args"]
