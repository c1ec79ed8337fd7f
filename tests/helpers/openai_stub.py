"""A loopback OpenAI-compatible chat server for tests, with fault injection.

:class:`StubServer` answers ``GET /v1/models`` and ``POST /v1/chat/completions`` on
127.0.0.1 (a free port) from a background thread, asking a test's ``answer(model, messages)``
for each reply's text. Faults are injected per request, chosen either by the request's arrival
number or by a key (a substring of the last user message's text, so they do not depend on the
order in which concurrent requests arrive):

- ``delay_s``: sleep before answering (longer than a client's timeout: a client timeout);
- ``status``: answer with that HTTP status and an OpenAI-style error body;
- ``malformed``: answer 200 with a broken body: ``"not_json"``, ``"no_choices"`` (JSON
  without ``choices``) or ``"bad_content"`` (``content`` is a number).

Every request body, its headers and the peak number of requests in flight are recorded, and
:func:`png_frames` decodes the ``image_url`` PNG data URLs of a request back to pixels, so a
test server can answer from what the frames show.
"""

from __future__ import annotations

import binascii
import dataclasses
import io
import json
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

MALFORMED = ("not_json", "no_choices", "bad_content")
_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+);base64,")


@dataclasses.dataclass(frozen=True)
class Fault:
    """What goes wrong with one request (see the module docstring)."""

    delay_s: float = 0.0
    status: int | None = None
    malformed: str | None = None

    def __post_init__(self):
        if self.malformed is not None and self.malformed not in MALFORMED:
            raise ValueError(f"malformed must be one of {MALFORMED}, got {self.malformed!r}")


# A fault plan entry: one Fault for every matching request, or a list whose i-th entry applies to
# the i-th matching request (None or past the end: no fault).
Plan = Fault | Sequence[Fault | None]


def last_user_text(messages: list) -> str:
    """The text of the last message (a string, or its text parts joined by newlines)."""
    content = messages[-1].get("content") if messages else ""
    if isinstance(content, str):
        return content
    return "\n".join(p.get("text", "") for p in content if p.get("type") == "text")


def _media_parts(messages: list, kind: str) -> list[tuple[str, bytes]]:
    """(mime type, bytes) of the ``kind`` (``image_url``/``video_url``) parts of all messages."""
    out = []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if part.get("type") != kind:
                continue
            url = part[kind]["url"]
            match = _DATA_URL.match(url)
            if not match:
                raise ValueError(f"{kind} is not a base64 data URL: {url[:40]!r}")
            out.append((match.group(1), binascii.a2b_base64(url[match.end() :])))
    return out


def png_frames(messages: list) -> np.ndarray:
    """The ``image_url`` parts of ``messages``, decoded: uint8 [n, H, W, 3] (n may be 0).

    Raises:
      ValueError: a part that is not a PNG data URL.
    """
    frames = []
    for mime, data in _media_parts(messages, "image_url"):
        if mime != "image/png":
            raise ValueError(f"image_url part is {mime}, not image/png")
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "PNG":
                raise ValueError(f"image_url data is {image.format}, not PNG")
            frames.append(np.asarray(image.convert("RGB")))
    return np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8)


def video_parts(messages: list) -> list[tuple[str, bytes]]:
    """(mime type, bytes) of every ``video_url`` part of ``messages``."""
    return _media_parts(messages, "video_url")


class StubServer:
    """An OpenAI-compatible chat server on loopback (use as a context manager).

    Args:
      answer: ``answer(model, messages) -> str``: the reply text of a request.
      models: the model ids ``GET /v1/models`` lists; a request naming another gets a 404.
      faults: ``{request number (0-based, arrival order) | key substring: Plan}``.

    Attributes:
      url: ``http://127.0.0.1:PORT/v1`` once started.
      bodies: every chat request body received (parsed JSON), in arrival order.
      headers: the headers of each of those requests (lower-case names).
      max_in_flight: the most chat requests ever being handled at once.
    """

    def __init__(
        self,
        answer: Callable[[str, list], str],
        *,
        models: Sequence[str] = ("stub-model",),
        faults: Mapping[int | str, Plan] | None = None,
    ):
        self.answer, self.models = answer, tuple(models)
        self.faults = dict(faults or {})
        self.bodies: list[dict] = []
        self.headers: list[dict[str, str]] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._hits: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> StubServer:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output quiet
                pass

            def do_GET(self):
                stub._get(self)

            def do_POST(self):
                stub._post(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)

    # ------------------------------------------------------------------ faults
    def _fault(self, number: int, text: str) -> Fault | None:
        """The fault of the ``number``-th request whose last user text is ``text``."""
        with self._lock:
            for key, plan in self.faults.items():
                if isinstance(key, int):
                    hit = key == number
                    index = 0
                else:
                    hit = key in text
                    index = self._hits.get(key, 0)
                    if hit:
                        self._hits[key] = index + 1
                if not hit:
                    continue
                if isinstance(plan, Fault):
                    return plan
                return plan[index] if index < len(plan) else None
        return None

    # ------------------------------------------------------------------ handlers
    def _send(self, handler, status: int, body: bytes, mime: str = "application/json") -> None:
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", mime)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test): nothing to answer

    def _get(self, handler) -> None:
        if handler.path.rstrip("/") != "/v1/models":
            self._send(handler, 404, _error(404, f"no route {handler.path}"))
            return
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "stub"} for m in self.models]
        self._send(handler, 200, json.dumps({"object": "list", "data": data}).encode())

    def _post(self, handler) -> None:
        if handler.path.rstrip("/") != "/v1/chat/completions":
            self._send(handler, 404, _error(404, f"no route {handler.path}"))
            return
        length = int(handler.headers.get("Content-Length", "0"))
        body = json.loads(handler.rfile.read(length))
        with self._lock:
            number = len(self.bodies)
            self.bodies.append(body)
            self.headers.append({k.lower(): v for k, v in handler.headers.items()})
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            self._complete(handler, number, body)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _complete(self, handler, number: int, body: dict) -> None:
        messages = body["messages"]
        fault = self._fault(number, last_user_text(messages)) or Fault()
        if fault.delay_s:
            time.sleep(fault.delay_s)
        if fault.status is not None:
            self._send(handler, fault.status, _error(fault.status, "injected fault"))
            return
        if body.get("model") not in self.models:
            self._send(handler, 404, _error(404, f"model {body.get('model')!r} not found"))
            return
        if fault.malformed == "not_json":
            self._send(handler, 200, b"<html>this is not JSON</html>")
            return
        text = self.answer(body["model"], messages)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
        completion = {
            "id": f"chatcmpl-{number}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(text.split()),
                "total_tokens": prompt_tokens + len(text.split()),
            },
        }
        if fault.malformed == "no_choices":
            del completion["choices"]
        elif fault.malformed == "bad_content":
            completion["choices"][0]["message"]["content"] = 42
        self._send(handler, 200, json.dumps(completion).encode())


def _error(status: int, message: str) -> bytes:
    """An OpenAI-style error body."""
    error = {"message": message, "type": "stub_error", "param": None, "code": str(status)}
    return json.dumps({"error": error}).encode()


__all__ = ["Fault", "StubServer", "last_user_text", "png_frames", "video_parts"]
