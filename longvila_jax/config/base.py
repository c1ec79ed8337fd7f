"""Typed configuration: frozen dataclasses as the schema, YAML as instances, dotted overrides.

Every config class in the project is a frozen dataclass. ``from_dict`` builds one from plain data
(YAML or JSON), rejecting unknown keys and wrongly typed values with a ``ConfigError`` that names
the dotted field path; ``__post_init__`` hooks raise ``ConfigError`` for semantic checks and
``from_dict`` prefixes their messages with the path of the offending sub-config. Validation uses
exceptions, never ``assert``, so it also runs under ``python -O``. YAML is read with the checked
loader of ``core.safe_load`` (size, depth, alias-expansion and duplicate-key limits), and values
are quoted in messages through ``core.errors.brief``, so a hostile file cannot blow a message up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from longvila_jax.core.errors import ConfigError, brief
from longvila_jax.core.safe_load import load_yaml_file, parse_yaml
from longvila_jax.core.safe_paths import write_atomic

T = TypeVar("T")
_MAX_KEY = 64
# Config integers are sizes, counts and ids: anything beyond int64 is hostile and would
# overflow numpy, C and float conversions downstream.
_INT_LIMIT = 2**63


def check(cond: bool, field: str, message: str) -> None:
    """Raises ``ConfigError(field, message)`` unless ``cond`` holds (an assert that survives -O)."""
    if not cond:
        raise ConfigError(field, message)


def _join(prefix: str, key: Any) -> str:
    """``prefix.key``; a key that is long or not printable (from a hostile file) is quoted
    through ``brief`` so field names stay short."""
    text = str(key) if isinstance(key, (str, int)) and not isinstance(key, bool) else brief(key)
    if len(text) > _MAX_KEY or not text.isprintable():
        text = brief(text)[:_MAX_KEY]
    return f"{prefix}.{text}" if prefix else text


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Converts ``value`` to the annotated type ``tp`` or raises ``ConfigError`` naming ``path``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: report X's own error and path
            return _coerce(options[0], value, path)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as e:
                errors.append(e.message)
        raise ConfigError(
            path, f"expected {_type_name(tp)}, got {brief(value)} ({'; '.join(errors)})"
        )
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(path, f"must be one of {list(args)}, got {brief(value)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected a mapping for {tp.__name__}, got {brief(value)}")
        return from_dict(tp, value, path)
    if origin in (tuple, list, Sequence) or tp in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(path, f"expected a list, got {brief(value)}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            item_types = [args[0]] * len(value)
        elif origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(path, f"expected {len(args)} items, got {len(value)}")
            item_types = list(args)
        else:
            item_types = [args[0] if args else Any] * len(value)
        return tuple(
            _coerce(t, v, f"{path}[{i}]")
            for i, (t, v) in enumerate(zip(item_types, value, strict=True))
        )
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected a mapping, got {brief(value)}")
        ktp, vtp = args if args else (Any, Any)
        return {
            _coerce(ktp, k, _join(path, k)): _coerce(vtp, v, _join(path, k))
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, f"expected a boolean, got {brief(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not -_INT_LIMIT < value < _INT_LIMIT:
                raise ConfigError(path, f"{brief(value)} does not fit in 64 bits")
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < _INT_LIMIT:
            return int(value)
        raise ConfigError(path, f"expected an integer, got {brief(value)}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if abs(value) < 1e308 else math.inf
        elif isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None and math.isfinite(number):
            return number
        raise ConfigError(path, f"expected a finite number, got {brief(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(path, f"expected a string, got {brief(value)}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(path, f"expected {_type_name(tp)}, got {brief(value)}")


def from_dict(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Builds the frozen dataclass ``cls`` from plain data, validating every field.

    Args:
      cls: a dataclass type.
      data: a mapping of field names to plain values (nested mappings for nested configs).
      path: dotted prefix used in error messages.

    Raises:
      ConfigError: naming the dotted path of an unknown key, a mistyped value or a failed check.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(path, f"expected a mapping for {cls.__name__}, got {brief(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        raise ConfigError(
            _join(path, unknown[0]),
            f"unknown key for {cls.__name__} (known: {', '.join(sorted(fields))})",
        )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(_join(path, name), f"required field of {cls.__name__} is missing")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise e.under(path) from None


def to_dict(cfg: Any) -> Any:
    """Converts a config (nested dataclasses, tuples, dicts) to plain YAML-able data."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    """Parses one ``a.b.c=value`` override; the value is YAML (``1e-5``, ``[1, 2]``, ``true``)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(key, f"override {brief(item)} must have the form a.b.c=value")
    value = parse_yaml(raw, key) if raw.strip() else ""
    return key, value


def apply_overrides(cls: type[T], data: Mapping[str, Any], overrides: Sequence[str]) -> T:
    """Builds ``cls`` from ``data`` after applying dotted ``--set`` overrides.

    Override paths are checked against the schema (with defaults filled in), so a typo in an
    override fails like a typo in the YAML file.
    """
    full = to_dict(from_dict(cls, data))
    for item in overrides:
        key, value = parse_override(item)
        node = full
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            sub = node.get(part) if isinstance(node, dict) else None
            if sub is None and isinstance(node, dict) and part in node:
                sub = node[part] = {}
            if not isinstance(sub, dict):
                raise ConfigError(
                    ".".join(parts[: i + 1]), f"override {brief(item)}: no such section"
                )
            node = sub
        if not isinstance(node, dict) or parts[-1] not in node:
            raise ConfigError(key, f"override {brief(item)}: unknown key")
        node[parts[-1]] = value
    return from_dict(cls, full)


def load_yaml(path: str | Path, what: str = "") -> dict[str, Any]:
    """Reads a YAML mapping; an empty file is ``{}``; anything else than a mapping is an error.

    Raises:
      ConfigError: naming ``what`` (the field that points at the file, ``""`` for a top-level
        file) and the path: missing, not a regular file, too large, invalid or hostile YAML
        (``core.safe_load``), or not a mapping.
    """
    data = load_yaml_file(path, what)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(what, f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path, overrides: Sequence[str] = ()) -> T:
    """Loads ``cls`` from a YAML file with optional dotted overrides."""
    try:
        return apply_overrides(cls, load_yaml(path), overrides)
    except ConfigError as e:
        raise ConfigError(e.field, f"{e.message} (in {path})") from None


def save_yaml(cfg: Any, path: str | Path) -> None:
    """Writes a config as YAML (round-trips through ``load_config``), atomically."""
    write_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())
