"""``POST /v1/chat/completions`` bodies: checked field by field into a :class:`ChatRequest`.

The body is parsed by the project's checked JSON parser (``core.safe_load.parse_json``: depth,
duplicate keys, NaN refused) and then walked by hand rather than by a schema library, so that
every refusal is a 400 whose ``param`` is the path a client would write
(``messages[0].content[1].image_url.url``) and whose message says what was expected.

What a request may hold (OpenAI's chat format, plus two extension fields):

- ``messages``: ``system`` / ``user`` / ``assistant`` turns; the last is the user's question.
  Its ``content`` is a string or a list of parts: ``{"type": "text", "text": ...}``,
  ``{"type": "image_url", "image_url": {"url": "data:image/...;base64,..."}}`` and
  ``{"type": "video_url", "video_url": {"url": "data:video/...;base64,..."}}``; with
  ``--media-root``, a url may also be a path under that root. Media go in the last message
  only; earlier turns are text.
- ``max_tokens`` (or ``max_completion_tokens``), ``temperature`` (default 0: greedy, as the
  CLI), ``top_p``, ``stop`` (a string or up to 4), ``seed`` (default 0), ``stream``,
  ``stream_options.include_usage``.
- Extensions: ``frames`` (frames per video) and ``fps`` (frames per second), with the model's
  defaults otherwise (``infer.Generator.load_frames``).

Fields we cannot honour (``n`` > 1, penalties, logprobs, tools) are refused rather than
ignored; a few bookkeeping fields (``user``, ``metadata``) are accepted and ignored; any other
unknown field is refused, which catches typos such as ``frame``.
"""

from __future__ import annotations

import binascii
import dataclasses
import math
import re
from typing import Any

from longvila_jax.core.errors import InputError, brief
from longvila_jax.core.safe_load import parse_json
from longvila_jax.serve.errors import APIError, bad_request
from longvila_jax.serve.limits import Limits

IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})
# Fields accepted only at the value that means "off".
DEFAULT_ONLY = {
    "n": (1,),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "logit_bias": ({},),
    "tools": ([],),
    "tool_choice": ("none", "auto"),
    "response_format": ({"type": "text"},),
}
KNOWN = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "stop",
        "seed",
        "stream",
        "stream_options",
        "frames",
        "fps",
    }
)
ROLES = ("system", "user", "assistant")
_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+)?((?:;[\w.+-]+=[\w.+-]+)*);base64,", re.ASCII)
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


@dataclasses.dataclass(frozen=True)
class Media:
    """One image or video of a request: decoded bytes (a data URL) or a path under the root."""

    kind: str  # "image" or "video"
    field: str  # the request path of its url, for errors
    data: bytes | None = None
    path: str | None = None


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """A checked chat-completion request."""

    model: str
    question: str
    history: tuple[dict[str, str], ...]
    media: tuple[Media, ...]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    frames: int | None
    fps: float | None


def parse_body(raw: bytes, limits: Limits, *, model_id: str, media_root: bool) -> ChatRequest:
    """Parses and checks a request body.

    Args:
      raw: the HTTP body (already bounded by ``limits.max_body_bytes``).
      limits: the server's limits.
      model_id: the served model's name (``model`` must be it).
      media_root: whether the server was started with ``--media-root`` (paths allowed).

    Raises:
      APIError: 400 naming the field (404 for an unknown model).
    """
    try:
        body = parse_json(raw, "body", InputError)
    except InputError as e:
        raise bad_request("body", f"malformed JSON ({e})", "invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("body", f"must be a JSON object, got {_kind(body)}", "invalid_json")
    for key, value in body.items():
        if key in KNOWN or key in IGNORED or value is None:
            continue
        if key in DEFAULT_ONLY:
            if value not in DEFAULT_ONLY[key] or isinstance(value, bool) != isinstance(
                DEFAULT_ONLY[key][0], bool
            ):
                raise bad_request(key, f"only {brief(DEFAULT_ONLY[key][0])} is supported")
            continue
        raise bad_request(_name(key), "unknown field", "unknown_field")
    model = body.get("model")
    if not isinstance(model, str):
        raise bad_request("model", f"must be a string, got {_kind(model)}")
    if model != model_id:
        raise APIError(
            404,
            f"model {brief(model)} does not exist; this server serves {model_id!r}",
            "model",
            "model_not_found",
        )
    history, question, media = _messages(body.get("messages"), media_root)
    if len(media) > limits.max_media_items:
        raise bad_request("messages", f"{len(media)} media parts > {limits.max_media_items}")
    max_tokens = body.get("max_completion_tokens")
    field = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, field = body.get("max_tokens"), "max_tokens"
    max_tokens = _int(max_tokens, field, 1, limits.max_new_tokens, limits.default_new_tokens)
    stream = _bool(body.get("stream"), "stream", False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad_request("stream_options", 'must be {"include_usage": bool}')
        include_usage = _bool(options.get("include_usage"), "stream_options.include_usage", False)
    frames = body.get("frames")
    frames = None if frames is None else _int(frames, "frames", 1, limits.max_frames, None)
    fps = body.get("fps")
    if fps is not None:
        fps = _number(fps, "fps", 0.0, 1000.0)
    return ChatRequest(
        model=model,
        question=question,
        history=tuple(history),
        media=tuple(media),
        max_tokens=max_tokens,
        temperature=_number(body.get("temperature", 0.0), "temperature", 0.0, 2.0),
        top_p=_top_p(body.get("top_p", 1.0)),
        seed=_int(body.get("seed"), "seed", -(2**31), 2**31 - 1, 0),
        stop=_stop(body.get("stop")),
        stream=stream,
        include_usage=include_usage,
        frames=frames,
        fps=fps,
    )


def _name(key: str) -> str:
    """A field name as a client wrote it, bounded (a hostile key may be huge or odd)."""
    return key if len(key) <= 64 and key.isprintable() else brief(key)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _int(value: Any, field: str, low: int, high: int, default: int | None) -> int | None:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(field, f"must be an integer, got {_kind(value)}", "invalid_type")
    if not low <= value <= high:
        raise bad_request(field, f"must be in [{low}, {high}], got {brief(value)}")
    return value


def _number(value: Any, field: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(field, f"must be a number, got {_kind(value)}", "invalid_type")
    if not (math.isfinite(value) and low <= value <= high):
        raise bad_request(field, f"must be in [{low}, {high}], got {brief(value)}")
    return float(value)


def _top_p(value: Any) -> float:
    top_p = _number(value, "top_p", 0.0, 1.0)
    if top_p == 0.0:
        raise bad_request("top_p", "must be in (0, 1], got 0")
    return top_p


def _bool(value: Any, field: str, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(field, f"must be true or false, got {_kind(value)}", "invalid_type")
    return value


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or len(items) > 4:
        raise bad_request("stop", "must be a string or a list of at most 4 strings")
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item or len(item) > 256:
            raise bad_request(f"stop[{i}]", "must be a non-empty string of at most 256 chars")
    return tuple(items)


def _messages(value: Any, media_root: bool) -> tuple[list[dict[str, str]], str, list[Media]]:
    if not isinstance(value, list) or not value:
        raise bad_request("messages", f"must be a non-empty list, got {_kind(value)}")
    if len(value) > 256:
        raise bad_request("messages", f"{len(value)} messages > 256")
    history: list[dict[str, str]] = []
    media: list[Media] = []
    question = ""
    last = len(value) - 1
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(where, f"must be an object, got {_kind(message)}", "invalid_type")
        role = message.get("role")
        if role not in ROLES:
            raise bad_request(f"{where}.role", f"must be one of {list(ROLES)}, got {brief(role)}")
        for key in message:
            if key not in ("role", "content", "name"):
                raise bad_request(f"{where}.{_name(key)}", "unknown field", "unknown_field")
        found: list[Media] = []
        text = _content(message.get("content"), f"{where}.content", found, media_root)
        if i == last:
            if role != "user":
                raise bad_request(f"{where}.role", "the last message must be the user's")
            question, media = text, found
        else:
            if found:
                raise bad_request(found[0].field, "media are accepted in the last message only")
            history.append({"role": role, "content": text})
    if not question.strip() and not media:
        raise bad_request(f"messages[{last}].content", "the question is empty")
    return history, question, media


def _content(value: Any, where: str, media: list[Media], media_root: bool) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise bad_request(where, f"must be a string or a list of parts, got {_kind(value)}")
    texts = []
    for j, part in enumerate(value):
        at = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise bad_request(at, f"must be an object, got {_kind(part)}", "invalid_type")
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise bad_request(f"{at}.text", f"must be a string, got {_kind(text)}")
            texts.append(text)
        elif kind in ("image_url", "video_url"):
            media.append(_media(part.get(kind), f"{at}.{kind}", kind[:5], media_root))
        else:
            raise bad_request(
                f"{at}.type", f"must be text, image_url or video_url, got {brief(kind)}"
            )
    return "\n".join(texts)


def _media(value: Any, at: str, kind: str, media_root: bool) -> Media:
    if isinstance(value, dict):
        unknown = set(value) - {"url", "detail"}
        if unknown:
            raise bad_request(f"{at}.{_name(sorted(unknown)[0])}", "unknown field", "unknown_field")
        value = value.get("url")
        at = f"{at}.url"
    if not isinstance(value, str) or not value:
        raise bad_request(at, f"must be a URL string, got {_kind(value)}")
    match = _DATA_URL.match(value)
    if match:
        mime = (match.group(1) or "").lower()
        if mime and not (mime.startswith(kind + "/") or mime == "application/octet-stream"):
            raise bad_request(at, f"a {mime} data URL in a {kind}_url part", "invalid_media_type")
        payload = value[match.end() :]
        try:
            data = binascii.a2b_base64(payload, strict_mode=True)
        except (binascii.Error, ValueError):
            raise bad_request(at, "the data URL is not valid base64", "invalid_base64") from None
        if not data:
            raise bad_request(at, "the data URL is empty", "invalid_base64")
        return Media(kind, at, data=data)
    if value.startswith("data:"):
        raise bad_request(at, "data URLs must be base64 (data:<type>;base64,<data>)")
    scheme = _SCHEME.match(value)
    if scheme and len(scheme.group(0)) > 2:  # "C:" is a drive letter, not a scheme
        name = scheme.group(0)[:-1].lower()
        why = "remote URLs are never fetched" if name in ("http", "https", "ftp") else "unsupported"
        raise bad_request(
            at, f"{name}: URLs are not accepted ({why}); send a data URL", "unsupported_url"
        )
    if not media_root:
        raise bad_request(
            at,
            "file paths are accepted only by a server started with --media-root",
            "unsupported_url",
        )
    return Media(kind, at, path=value)


__all__ = ["ChatRequest", "Media", "parse_body"]
