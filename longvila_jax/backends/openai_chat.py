"""Any OpenAI-compatible chat endpoint as a :class:`~longvila_jax.backends.base.ChatBackend`.

Requests go through the official ``openai`` client (``POST {url}/chat/completions``), several at
once (a thread pool of ``concurrency`` workers: the endpoint, not this process, does the work).
A request's clip is sampled here with ``data.clips.ClipReader`` (a killable decoder child, so a
hostile video cannot hang the pipeline) and sent with the text in one user message, either as
its frames, one ``image_url`` part per frame holding a PNG data URL (lossless: a server sees the
exact pixels we sampled), or as one ``video_url`` part holding those frames re-encoded as a
small mp4 (for endpoints that sample video themselves). The project's own server
(``python -m longvila_jax.serve``) accepts both.

The client's own retries are off (``max_retries=0``) so that retries are ours and counted:
timeouts, connection errors, HTTP 408/429/5xx and malformed answers (a body that is not JSON,
no ``choices[0].message.content``, content that is not a string) are retried with exponential
backoff and jitter; other 4xx answers are final. A request that still fails becomes a
:class:`~longvila_jax.backends.base.BackendError` in its slot (kind ``timeout``,
``connection``, ``http_<status>``, ``malformed_response`` or ``media``); the others in the
batch are unaffected. The API key is read from an environment variable and never shown.
"""

from __future__ import annotations

import base64
import io
import os
import random
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import openai
from PIL import Image

from longvila_jax.backends.base import BackendError, ChatReply, ChatRequest, Usage
from longvila_jax.core.errors import InputError, brief
from longvila_jax.core.safe_load import parse_json
from longvila_jax.data.clips import ClipReader
from longvila_jax.data.skips import SampleSkipped
from longvila_jax.data.video import write_video

MEDIA_MODES = ("frames", "video")
MAX_BACKOFF_S = 30.0  # one wait never exceeds this, however many retries
RETRY_STATUS = frozenset({408, 429})  # plus every 5xx


class _Malformed(Exception):
    """A 200 answer that is not a chat completion (retried, then ``malformed_response``)."""


def _check_url(url: str) -> None:
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError(f"endpoint URL must start with http:// or https://, got {brief(url)}")


class OpenAIChat:
    """A chat backend over an OpenAI-compatible endpoint (module docstring).

    Args:
      url: the API base URL, e.g. ``http://127.0.0.1:8000/v1`` (http or https).
      model: the ``model`` to request; None asks ``GET {url}/models`` once and takes the first.
      api_key_env: the environment variable holding the API key (``"none"`` when unset, which
        local servers accept).
      timeout_s: per-attempt HTTP timeout.
      retries: retries after the first attempt (so at most ``retries + 1`` attempts).
      backoff_s: base of the backoff: attempt k waits ``backoff_s * 2**k * U(0.5, 1)`` s, at
        most ``MAX_BACKOFF_S``.
      concurrency: requests in flight at once.
      media: ``"frames"`` (PNG ``image_url`` parts) or ``"video"`` (one mp4 ``video_url``).
      frame_size: side of the sampled square frames in pixels (even in video mode).
      frames_timeout_s: decoder child timeout per clip (``ClipReader``).
      clip_reader: a ``ClipReader`` to use; by default one is made on the first media request
        and closed by :meth:`close` (a reader passed in belongs to the caller).

    Raises:
      ValueError: a bad argument (named).
      InputError: ``model`` is None and the endpoint lists no model (the URL is named).
    """

    def __init__(
        self,
        url: str,
        model: str | None = None,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff_s: float = 1.0,
        concurrency: int = 4,
        media: str = "frames",
        frame_size: int = 448,
        frames_timeout_s: float = 60.0,
        clip_reader: ClipReader | None = None,
    ):
        _check_url(url)
        if media not in MEDIA_MODES:
            raise ValueError(f"media must be one of {MEDIA_MODES}, got {brief(media)}")
        if not (timeout_s > 0 and frames_timeout_s > 0 and backoff_s >= 0):
            raise ValueError("timeout_s and frames_timeout_s must be > 0, backoff_s >= 0")
        if retries < 0 or concurrency < 1:
            raise ValueError(
                f"retries must be >= 0 and concurrency >= 1 ({retries}, {concurrency})"
            )
        if frame_size < 16 or (media == "video" and frame_size % 2):
            raise ValueError(f"frame_size must be >= 16 (and even for video), got {frame_size}")
        self.url, self.media, self.frame_size = url, media, frame_size
        self.retries, self.backoff_s, self.concurrency = retries, backoff_s, concurrency
        self.usage = Usage()
        self.client = openai.OpenAI(
            base_url=url,
            api_key=os.environ.get(api_key_env) or "none",
            timeout=timeout_s,
            max_retries=0,
        )
        self.model = model or self._first_model()
        self.name = f"openai:{url}#{self.model}"
        self._frames_timeout_s = frames_timeout_s
        self._reader, self._own_reader = clip_reader, clip_reader is None
        # One decoder child serves one request at a time; the HTTP calls still overlap.
        self._reader_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="openai-chat")

    def _first_model(self) -> str:
        try:
            models = [m.id for m in self.client.models.list()]
        except openai.OpenAIError as e:
            raise InputError(
                f"openai:{self.url}: cannot list the models ({type(e).__name__}: {brief(str(e))});"
                " name one as openai:URL#model"
            ) from None
        if not models or not isinstance(models[0], str) or not models[0]:
            raise InputError(
                f"openai:{self.url}: GET /models lists no model; name one as openai:URL#model"
            )
        return models[0]

    # ------------------------------------------------------------------ requests
    def chat(self, requests: Sequence[ChatRequest]) -> list[ChatReply | BackendError]:
        """Answers ``requests`` concurrently; one reply or error per request, in order."""
        futures = [self._pool.submit(self._one, r) for r in requests]
        return [f.result() for f in futures]

    def _one(self, request: ChatRequest) -> ChatReply | BackendError:
        self.usage.add(requests=1)
        try:
            messages = self._messages(request)
            reply = self._send(request, messages)
        except BackendError as e:
            self.usage.add(failures=1)
            return e
        self.usage.add(prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens)
        return reply

    def _messages(self, request: ChatRequest) -> list[dict[str, Any]]:
        """The chat messages: optional system, then the user's media parts and text."""
        messages = []
        if request.system is not None:
            messages.append({"role": "system", "content": request.system})
        if request.media is None:
            messages.append({"role": "user", "content": request.prompt})
            return messages
        frames = self._frames(request)
        if self.media == "frames":
            parts = [{"type": "image_url", "image_url": {"url": png_data_url(f)}} for f in frames]
        else:
            duration = max(request.media.end_s - request.media.start_s, 1e-3)
            url = mp4_data_url(frames, max(1, round(len(frames) / duration)))
            parts = [{"type": "video_url", "video_url": {"url": url}}]
        parts.append({"type": "text", "text": request.prompt})
        messages.append({"role": "user", "content": parts})
        return messages

    def _frames(self, request: ChatRequest) -> np.ndarray:
        """uint8 [n, S, S, 3] frames of the request's clip; BackendError(media) if unreadable."""
        media = request.media
        try:
            with self._reader_lock:
                if self._reader is None:
                    self._reader = ClipReader(self._frames_timeout_s)
                return self._reader.frames(
                    media.path, self.frame_size, media.start_s, media.end_s, media.num_frames
                )
        except SampleSkipped as e:
            raise BackendError(request.key, "media", str(e)) from None
        except (InputError, OSError) as e:
            raise BackendError(request.key, "media", f"{type(e).__name__}: {e}") from None

    def _send(self, request: ChatRequest, messages: list) -> ChatReply:
        """One request with retries (module docstring); BackendError once they are spent."""
        for attempt in range(self.retries + 1):
            try:
                raw = self.client.chat.completions.with_raw_response.create(
                    model=self.model,
                    messages=messages,
                    max_tokens=request.max_tokens,
                    temperature=request.temperature,
                    seed=request.seed,
                )
                text, model, prompt_tokens, completion_tokens = _completion(
                    raw.http_response.content
                )
                return ChatReply(
                    text, model or self.model, prompt_tokens, completion_tokens, attempt + 1
                )
            except openai.APITimeoutError:  # before APIConnectionError: it is a subclass
                kind, detail, retry = "timeout", "no answer in time", True
            except openai.APIConnectionError as e:
                kind, detail, retry = "connection", brief(str(e)), True
            except openai.APIStatusError as e:
                status = e.status_code
                kind, detail = f"http_{status}", brief(str(e))
                retry = status in RETRY_STATUS or status >= 500
            except (_Malformed, openai.APIResponseValidationError) as e:
                kind, detail, retry = "malformed_response", brief(str(e)), True
            if not retry or attempt == self.retries:
                raise BackendError(request.key, kind, f"{detail} (attempt {attempt + 1})")
            self.usage.add(retries=1)
            wait = self.backoff_s * 2**attempt * random.uniform(0.5, 1.0)
            time.sleep(min(wait, MAX_BACKOFF_S))
        raise AssertionError("unreachable")  # the loop returns or raises

    def close(self) -> None:
        """Waits for requests in flight, closes the HTTP client and the decoder child."""
        self._pool.shutdown(wait=True)
        self.client.close()
        if self._own_reader and self._reader is not None:
            self._reader.close()
            self._reader = None


def _completion(body: bytes) -> tuple[str, str | None, int, int]:
    """(text, model, prompt tokens, completion tokens) of a chat completion body.

    Raises:
      _Malformed: the body is not JSON or has no string ``choices[0].message.content``.
    """
    data = parse_json(body, "response body", _Malformed)
    if not isinstance(data, dict):
        raise _Malformed(f"response body is a {type(data).__name__}, not an object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _Malformed("response has no choices[0]")
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        raise _Malformed(f"choices[0].message.content is {brief(content)}, not a string")
    model = data.get("model") if isinstance(data.get("model"), str) else None
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    counts = [usage.get(k) for k in ("prompt_tokens", "completion_tokens")]
    counts = [c if isinstance(c, int) and not isinstance(c, bool) and c >= 0 else 0 for c in counts]
    return content, model, counts[0], counts[1]


def png_data_url(frame: np.ndarray) -> str:
    """A ``data:image/png;base64,...`` URL of one uint8 [H, W, 3] frame (lossless)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame), "RGB").save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def mp4_data_url(frames: np.ndarray, fps: int) -> str:
    """A ``data:video/mp4;base64,...`` URL of uint8 [n, H, W, 3] frames (H, W even) at ``fps``."""
    with tempfile.TemporaryDirectory(prefix="openai-chat-") as tmp:
        path = Path(tmp) / "clip.mp4"
        write_video(path, frames, fps=fps)
        data = path.read_bytes()
    return "data:video/mp4;base64," + base64.b64encode(data).decode("ascii")


__all__ = ["MEDIA_MODES", "OpenAIChat", "mp4_data_url", "png_data_url"]
