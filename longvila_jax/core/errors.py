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


class _Repr(reprlib.Repr):
    """``reprlib.Repr`` that also bounds integers: ``repr`` of an int over Python's digit limit
    raises, and a 10**4000-digit value would fill a message anyway."""

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 256:
            return f"<{x.bit_length()}-bit int>"
        return repr(x)


_REPR = _Repr()
_REPR.maxstring = 80
_REPR.maxother = 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxdict = 6
_REPR.maxlevel = 3
MAX_MESSAGE = 400  # a value quoted by ``brief``
MAX_ERROR = 2000  # a whole ``InputError`` message
MAX_FIELD = 200  # a ``ConfigError`` field path
_PATH_HEAD, _PATH_TAIL = 120, 60


def brief(value: Any) -> str:
    """``repr(value)`` bounded in length and depth (at most about 400 characters); never raises."""
    try:
        text = _REPR.repr(value)
    except Exception:  # a hostile __repr__ or a value repr() refuses: name the type only
        return f"<{type(value).__name__}>"
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def brief_path(path: Any) -> str:
    """A path for a message: as is when short, else its head and tail around ``...``; any
    character a terminal would act on (controls, lone surrogates) escaped."""
    text = str(path).encode("utf-8", "backslashreplace").decode("utf-8")
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    if len(text) <= _PATH_HEAD + _PATH_TAIL + 3:
        return text
    return f"{text[:_PATH_HEAD]}...{text[-_PATH_TAIL:]}"


def _bounded(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    keep = limit - 5
    return f"{text[: keep * 3 // 4]} ... {text[-(keep // 4) :]}"


class InputError(ValueError):
    """A file, record or value read from outside is malformed, inconsistent or unsafe.

    The message is bounded (``MAX_ERROR`` characters, the middle elided): the last line of
    defence against a hostile value formatted into it somewhere without ``brief``.
    """

    def __init__(self, *args: Any):
        if len(args) == 1 and isinstance(args[0], str):
            args = (_bounded(args[0], MAX_ERROR),)
        super().__init__(*args)


class ConfigError(InputError):
    """A configuration value is missing, unknown, mistyped or inconsistent.

    ``field`` is the dotted path of the offending field (``""`` for the whole config).
    """

    def __init__(self, field: str, message: str):
        self.field = _bounded(str(field), MAX_FIELD)
        self.message = message
        super().__init__(f"{self.field}: {message}" if self.field else message)

    def __reduce__(self):  # picklable across grain worker processes
        return (type(self), (self.field, self.message))

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


__all__ = [
    "MAX_MESSAGE",
    "CheckpointError",
    "ConfigError",
    "InputError",
    "brief",
    "brief_path",
    "make_error",
]
