"""The project's error types for malformed or hostile input, and bounded error messages.

Every file the project reads may be hostile, so a bad file must end in one of these errors
with a message naming the file and the field, tensor or sample, never in a traceback from deep
inside a parser. ``InputError`` is the common base: the fuzz tests accept it (or success) as
the only outcome of feeding mutated inputs to a parser.

``brief`` keeps hostile values out of messages at full size: a YAML alias bomb or a megabyte
string would otherwise be formatted in full into an exception message.
"""

from __future__ import annotations

import reprlib
from typing import Any

_REPR = reprlib.Repr()
_REPR.maxstring = 80
_REPR.maxother = 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxdict = 6
_REPR.maxlevel = 3
MAX_MESSAGE = 400


def brief(value: Any) -> str:
    """``repr(value)`` bounded in length and depth (at most about 400 characters)."""
    text = _REPR.repr(value)
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


class InputError(ValueError):
    """A file, record or value read from outside is malformed, inconsistent or unsafe."""


class ConfigError(InputError):
    """A configuration value is missing, unknown, mistyped or inconsistent.

    ``field`` is the dotted path of the offending field (``""`` for the whole config).
    """

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)

    def under(self, prefix: str) -> ConfigError:
        """Returns the same error with ``prefix`` prepended to the field path."""
        if not prefix:
            return self
        return ConfigError(f"{prefix}.{self.field}" if self.field else prefix, self.message)


class CheckpointError(InputError):
    """A weight file or checkpoint directory is malformed, incomplete, tampered with or unsafe."""


def make_error(error: type[Exception], what: str, message: str) -> Exception:
    """``error`` naming ``what``: ``ConfigError(what, message)`` takes the field separately, any
    other type gets ``"<what>: <message>"``."""
    if isinstance(error, type) and issubclass(error, ConfigError):
        return error(what, message)
    return error(f"{what}: {message}")


__all__ = ["MAX_MESSAGE", "CheckpointError", "ConfigError", "InputError", "brief", "make_error"]
