"""Backend specs: the one string a tool's ``--captioner`` / ``--writer`` / ``--judge`` flag takes.

=========================  ==========================================================
``local:DIR``              our checkpoint at DIR in this process (``backends.local``)
``openai:URL``             an OpenAI-compatible endpoint, its first listed model
``openai:URL#MODEL``       the same, naming the model (``backends.openai_chat``)
``oracle``                 the synthetic corpus' ground truth: the oracle captioner, writer
                           or judge, by role (``backends.oracle``, ``backends.oracle_judge``)
=========================  ==========================================================

URLs must be ``http://`` or ``https://``; a bare directory is refused (did you mean
``local:DIR``?), so a typo never silently picks a kind.

A tool hands :func:`open_backend` one set of options for whatever spec the user gives
(``concurrency=8, batch_size=4, ...``): each backend takes the options its constructor knows
and ignores the others' (``batch_size`` means nothing to an endpoint), while a name that no
backend knows is refused as a typo. The oracles take no option.
"""

from __future__ import annotations

import inspect
from typing import Any

from longvila_jax.backends.base import ROLES, ChatBackend
from longvila_jax.backends.local import LocalChat
from longvila_jax.backends.openai_chat import OpenAIChat
from longvila_jax.backends.oracle import OracleCaptioner, OracleWriter
from longvila_jax.backends.oracle_judge import OracleJudge
from longvila_jax.core.errors import brief

KINDS = ("local", "openai", "oracle")
_ORACLES = {"captioner": OracleCaptioner, "writer": OracleWriter, "judge": OracleJudge}


def _options_of(cls: type) -> frozenset[str]:
    """The keyword options a backend's constructor takes (beyond its target)."""
    params = inspect.signature(cls.__init__).parameters.values()
    return frozenset(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def parse_spec(spec: str) -> tuple[str, str | None, str | None]:
    """Splits a backend spec (module docstring).

    Args:
      spec: ``local:DIR``, ``openai:URL``, ``openai:URL#MODEL`` or ``oracle``.

    Returns:
      (kind, target, model): kind in :data:`KINDS`; target the directory or URL (None for
      ``oracle``); model the ``#MODEL`` of an ``openai:`` spec, else None.

    Raises:
      ValueError: an unknown kind, an empty target, a non-http(s) URL, an empty ``#`` model,
        or a bare path (the spec is named in the message).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"backend spec must be a non-empty string, got {brief(spec)}")
    spec = spec.strip()
    if spec == "oracle":
        return "oracle", None, None
    kind, sep, target = spec.partition(":")
    if kind == "local" and sep:
        if not target:
            raise ValueError(f"backend spec {brief(spec)}: local: needs a directory (local:DIR)")
        return "local", target, None
    if kind == "openai" and sep:
        url, hash_sign, model = target.partition("#")
        if not url.startswith(("http://", "https://")) or url in ("http://", "https://"):
            raise ValueError(
                f"backend spec {brief(spec)}: the URL must be http:// or https:// "
                "(openai:http://host:port/v1[#model])"
            )
        if hash_sign and not model:
            raise ValueError(f"backend spec {brief(spec)}: empty model after '#'")
        return "openai", url, model or None
    # No kind, or a "kind" that is itself a path (/data/x:1, C:\\ckpt): a bare directory.
    if not sep or any(c in kind for c in "/\\.") or len(kind) == 1:
        raise ValueError(
            f"backend spec {brief(spec)} is not a spec; for a checkpoint directory write "
            f"local:{spec} (specs: local:DIR, openai:URL[#model], oracle)"
        )
    raise ValueError(
        f"backend spec {brief(spec)}: unknown kind {brief(kind)} "
        "(specs: local:DIR, openai:URL[#model], oracle)"
    )


def open_backend(spec: str, role: str, **options: Any) -> ChatBackend:
    """Opens the backend a spec names, for one role of a tool.

    Args:
      spec: see :func:`parse_spec`.
      role: one of ``base.ROLES`` (``captioner``, ``writer``, ``judge``): which oracle
        ``oracle`` means; the other kinds serve every role.
      **options: constructor options of ``OpenAIChat`` / ``LocalChat`` (module docstring).

    Returns:
      a :class:`~longvila_jax.backends.base.ChatBackend`; the caller closes it.

    Raises:
      ValueError: a bad spec, an unknown role or an option no backend takes.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {brief(role)}")
    known = _options_of(OpenAIChat) | _options_of(LocalChat)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown backend option(s) {unknown}; known: {sorted(known)}")
    kind, target, model = parse_spec(spec)
    if kind == "oracle":
        return _ORACLES[role]()
    cls = OpenAIChat if kind == "openai" else LocalChat
    taken = {k: v for k, v in options.items() if k in _options_of(cls)}
    return OpenAIChat(target, model, **taken) if kind == "openai" else LocalChat(target, **taken)


__all__ = ["KINDS", "open_backend", "parse_spec"]
