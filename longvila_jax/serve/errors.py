"""OpenAI-style errors: every refusal the server sends is one ``APIError`` rendered as
``{"error": {"message", "type", "param", "code"}}`` with its HTTP status.

``param`` names the offending request field with the path a client would write
(``messages[0].content[1].video_url.url``, ``max_tokens``), so a caller can fix the request
without reading server logs. Messages are bounded (``core.errors.brief``) and never carry a
traceback, a server-side path or the client's media.
"""

from __future__ import annotations

from typing import Any

from longvila_jax.core.errors import MAX_MESSAGE

# OpenAI's error types by status (``openai`` maps the status to its exception classes).
_TYPE_OF_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    504: "timeout_error",
}


class APIError(Exception):
    """A request the server refuses or cannot finish, with what the client needs to know.

    Args:
      status: the HTTP status (4xx for the client's input, 429 when full, 5xx for the server).
      message: one human-readable sentence (bounded here).
      param: the offending field, or None when no single field is at fault.
      code: a short machine-readable reason (``context_length_exceeded``, ``invalid_video``).
    """

    def __init__(self, status: int, message: str, param: str | None = None, code: str = ""):
        if len(message) > 2 * MAX_MESSAGE:
            message = message[: 2 * MAX_MESSAGE - 3] + "..."
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code or _TYPE_OF_STATUS.get(status, "error")

    @property
    def type(self) -> str:
        return _TYPE_OF_STATUS.get(self.status, "server_error" if self.status >= 500 else "error")

    def body(self) -> dict[str, Any]:
        """The JSON body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad_request(param: str | None, message: str, code: str = "invalid_value") -> APIError:
    """A 400 naming ``param``; the message starts with it so a log line is self-contained."""
    text = f"{param}: {message}" if param else message
    return APIError(400, text, param, code)


__all__ = ["APIError", "bad_request"]
