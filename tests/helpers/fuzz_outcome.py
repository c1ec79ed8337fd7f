"""The property every fuzz test checks, and helpers for running parsers on files.

The only outcomes allowed for a mutated input are success or the project's ``InputError``:
a ``ConfigError`` naming a field, or an error whose message names the file, bounded in
length (alias bombs and huge values must not be formatted in full). Anything else (a
``TypeError`` from deep inside a parser, ``RecursionError``, ``OverflowError``, a hang)
propagates and fails the example.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Sequence

from helpers import limits as _limits
from helpers.limits import Hang
from longvila_jax.core.errors import ConfigError, InputError
from longvila_jax.core.safe_load import parse_json

MAX_MESSAGE_CHARS = 2000
TIME_LIMIT_S = 20.0


@contextlib.contextmanager
def time_limit(seconds: float = TIME_LIMIT_S):
    """A parser call on one small input must end within ``seconds`` (``Hang`` otherwise)."""
    with _limits.time_limit(seconds, Hang):
        yield


def raised_at(e: BaseException) -> str:
    """``file:line`` of the innermost frame of ``e``'s traceback."""
    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return "?"
    f = frames[-1]
    return f"{os.path.relpath(f.filename)}:{f.lineno}"


def check_error(e: InputError, names: Sequence[str] = ()) -> None:
    """An allowed error must say what is wrong, where, and in bounded space."""
    msg = str(e)
    at = f"{type(e).__name__} raised at {raised_at(e)}"
    assert len(msg) <= MAX_MESSAGE_CHARS, f"unbounded message ({len(msg)} chars) from {at}"
    assert msg.strip(), f"empty message from {at}"
    if isinstance(e, ConfigError) and e.field:
        return
    assert any(n and n in msg for n in names), (
        f"message names no field or file ({at}): {msg[:300]!r}"
    )


_WRITTEN: dict[str, bytes] = {}


def write_if_changed(path, data: bytes) -> None:
    """Writes ``data`` to ``path`` unless this process last wrote exactly that there (the
    examples rewrite the same few files; a write costs more than most parses)."""
    key = str(path)
    if _WRITTEN.get(key) != data:
        path.write_bytes(data)
        _WRITTEN[key] = data


def checked_loader_refusal(raw: bytes) -> str | None:
    """Why ``core.safe_load`` refuses ``raw`` as JSON (None: it accepts it). Every config,
    header, index and manifest goes through that loader, so a parser that accepts what it
    refuses (duplicate keys, NaN/Infinity, ``1e400``, nesting deeper than 64, invalid UTF-8)
    bypassed it."""
    try:
        parse_json(raw, "json", InputError)
    except InputError as e:
        return str(e)
    return None


def outcome(call, names: Sequence[str] = ()):
    """``call()``'s result, or None after an allowed ``InputError`` (checked by ``check_error``).

    Any other exception (or a run past the time limit) propagates: the example fails.
    """
    with time_limit():
        try:
            return call()
        except InputError as e:
            check_error(e, names)
            return None
