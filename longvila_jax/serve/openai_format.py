"""OpenAI's chat-completion objects: the response, the streamed chunks and their SSE framing.

The shapes are those the ``openai`` Python package parses (``ChatCompletion`` and
``ChatCompletionChunk``): a stream is ``data: <chunk JSON>\\n\\n`` events, the first chunk
carrying the assistant role, the last one the ``finish_reason`` (and, with
``stream_options.include_usage``, a final chunk with empty ``choices`` and the usage), then
``data: [DONE]``. An error after the stream has started is an event ``{"error": {...}}``,
which the client raises as an ``APIError``. Beside the standard fields, responses carry
``x_longvila``: frames used and timings (the UI shows them).
"""

from __future__ import annotations

import json
import time
import uuid


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """OpenAI's usage; ``prompt_tokens`` includes every visual token."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def extras(timings: dict) -> dict:
    """Frames used and timings of one request (seconds)."""

    def span(a: str, b: str) -> float | None:
        return round(timings[b] - timings[a], 4) if a in timings and b in timings else None

    return {
        "frames": timings.get("frames", 0),
        "media_s": round(timings.get("media_s", 0.0), 4),
        "queue_s": span("queued_at", "started_at"),
        "time_to_first_token_s": span("admitted_at", "first_token_at"),
        "prefill_s": span("started_at", "first_token_at"),
        "generation_s": span("started_at", "done_at"),
        "total_s": span("admitted_at", "done_at"),
    }


def completion(cid, model, text, finish_reason, prompt_tokens, completion_tokens, timings) -> dict:
    """A non-streamed ``chat.completion``."""
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
        "x_longvila": extras(timings),
    }


def chunk(cid, model, created, delta: dict, finish_reason=None, **extra) -> dict:
    """One ``chat.completion.chunk``."""
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
        **extra,
    }


def usage_chunk(cid, model, created, prompt_tokens, completion_tokens, timings) -> dict:
    """The last chunk of ``stream_options.include_usage``: no choices, the usage."""
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens),
        "x_longvila": extras(timings),
    }


def sse(payload: dict | str) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


DONE = sse("[DONE]")

__all__ = ["DONE", "chunk", "completion", "completion_id", "extras", "sse", "usage", "usage_chunk"]
