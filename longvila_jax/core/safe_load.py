"""The one checked JSON/YAML loader: every config, header, index and manifest goes through it.

Python's parsers accept things a hostile file can use against us, so the loader adds limits
and refusals, each ending in the caller's ``InputError`` type with a message naming the file:

- **Size**: files are read with ``safe_paths.read_regular`` under a byte cap (FIFOs and devices
  are refused before a read can block).
- **Depth**: nesting beyond ``MAX_DEPTH`` (64) is refused; a deeper document never reaches
  Python's recursion limit, so no ``RecursionError`` escapes.
- **Duplicate keys** (JSON objects and YAML mappings) are refused: parsers keep the last one
  silently, so two readers could see different values.
- **JSON constants** ``NaN``/``Infinity`` and overflowing floats (``1e400``) are refused.
- **YAML aliases**: ``yaml.safe_load`` shares aliased nodes, but anything that walks the result
  (messages, ``to_dict``, fingerprints) expands them; a 1 KB alias bomb expands to gigabytes.
  The composed graph's *expanded* node count is bounded by ``MAX_YAML_NODES`` and recursive
  aliases are refused, before anything is constructed. Tags beyond the safe set are refused.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import yaml

from longvila_jax.core.errors import ConfigError, brief, brief_path, make_error
from longvila_jax.core.safe_paths import read_regular

MAX_CONFIG_BYTES = 16 << 20
MAX_DEPTH = 64
MAX_YAML_NODES = 100_000
MAX_INT_CHARS = 100  # longest integer literal in YAML (a 64-bit int needs 20 digits)


class _Refused(Exception):
    """Raised inside a parser hook; turned into the caller's error type."""


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of plain JSON data (iterative: no recursion on hostile input)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        stack.extend((c, d + 1) for c in children)
    return deepest


def _pairs(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _Refused(f"duplicate key {brief(key)}")
            seen.add(key)
    return out


def _constant(name: str) -> Any:
    raise _Refused(f"non-standard JSON constant {name}")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"number {brief(text)} overflows a float")
    return value


def _json(data: bytes | str, max_depth: int) -> Any:
    """Parsed JSON, or ``_Refused`` with the reason."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = json.loads(
            text, object_pairs_hook=_pairs, parse_constant=_constant, parse_float=_float
        )
    except UnicodeDecodeError as e:
        raise _Refused(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise _Refused(f"invalid JSON ({e.msg} at line {e.lineno})") from None
    except _Refused as e:
        raise _Refused(f"invalid JSON ({e})") from None
    except RecursionError:
        raise _Refused(f"JSON nested deeper than {max_depth} levels") from None
    except ValueError as e:  # e.g. an integer literal over Python's digit limit
        raise _Refused(f"invalid JSON ({brief(str(e))})") from None
    if _depth(value, max_depth) > max_depth:
        raise _Refused(f"JSON nested deeper than {max_depth} levels")
    return value


def parse_json(
    data: bytes | str,
    what: str,
    error: type[Exception] = ConfigError,
    *,
    max_depth: int = MAX_DEPTH,
) -> Any:
    """Parses JSON text (bytes must be UTF-8) with the limits of the module docstring.

    Raises:
      error: naming ``what``: invalid UTF-8 or JSON, duplicate keys, NaN/Infinity, too deep.
    """
    try:
        return _json(data, max_depth)
    except _Refused as e:
        raise make_error(error, what, str(e)) from None


def load_json(
    path: str | os.PathLike,
    what: str,
    error: type[Exception] = ConfigError,
    *,
    expect: type | None = dict,
    max_bytes: int | None = MAX_CONFIG_BYTES,
    max_depth: int = MAX_DEPTH,
    root: str | os.PathLike | None = None,
) -> Any:
    """Reads and parses JSON file ``path`` (a regular file of at most ``max_bytes``).

    Args:
      expect: the required top-level type (``dict``, ``list``) or None for any.
      root: symlinks of ``path`` must stay inside ``root`` (``safe_paths.open_regular``).

    Raises:
      error: naming ``what`` and ``path``.
    """
    raw = read_regular(path, what, error, max_bytes=max_bytes, root=root)
    try:
        value = _json(raw, max_depth)
    except _Refused as e:
        raise make_error(error, what, f"{brief_path(path)}: {e}") from None
    if expect is not None and not isinstance(value, expect):
        word = {dict: "object", list: "list"}.get(expect, expect.__name__)
        raise make_error(
            error, what, f"{brief_path(path)} must hold a JSON {word}, not {type(value).__name__}"
        )
    return value


class _Loader(yaml.SafeLoader):
    """SafeLoader with a depth limit, duplicate-key refusal and an expansion bound."""

    max_depth = MAX_DEPTH
    _level = 0

    def compose_node(self, parent, index):
        self._level += 1
        try:
            if self._level > self.max_depth:
                raise _Refused(f"YAML nested deeper than {self.max_depth} levels")
            return super().compose_node(parent, index)
        finally:
            self._level -= 1

    def construct_yaml_int(self, node):
        # Long literals are refused before conversion: base-60 ints (``1:2:3``) convert in
        # quadratic time and huge values break every f-string that formats them later.
        if len(node.value) > MAX_INT_CHARS:
            line = node.start_mark.line + 1
            raise _Refused(f"integer literal of {len(node.value)} characters at line {line}")
        return super().construct_yaml_int(node)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if (
                    isinstance(key_node, yaml.ScalarNode)
                    and key_node.tag != "tag:yaml.org,2002:merge"
                ):
                    key = (key_node.tag, key_node.value)
                    if key in seen:
                        line = key_node.start_mark.line + 1
                        raise _Refused(f"duplicate key {brief(key_node.value)} at line {line}")
                    seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def _expanded_size(node: yaml.Node, limit: int) -> int:
    """Nodes in the tree that aliases expand ``node`` to; refuses cycles and totals > limit."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(n: yaml.Node) -> int:  # recursion depth is bounded by the composer's depth limit
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise _Refused("recursive YAML alias")
        active.add(key)
        total = 1
        if isinstance(n, yaml.SequenceNode):
            children = n.value
        elif isinstance(n, yaml.MappingNode):
            children = [c for pair in n.value for c in pair]
        else:
            children = []
        for c in children:
            total += size(c)
            if total > limit:
                raise _Refused(f"YAML expands to more than {limit} nodes (alias bomb?)")
        active.discard(key)
        sizes[key] = total
        return total

    return size(node)


def _yaml(text: str | bytes, max_depth: int, max_nodes: int) -> Any:
    """Parsed YAML, or ``_Refused`` with the reason."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Refused(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    loader = None
    try:
        loader = _Loader(text)  # the reader rejects control characters here already
        loader.max_depth = max_depth
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, max_nodes)
        return loader.construct_document(node)
    except _Refused as e:
        raise _Refused(f"invalid YAML ({e})") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = brief(e.problem or e.context or "")
        raise _Refused(f"invalid YAML{where}: {problem}") from None
    except yaml.YAMLError as e:
        raise _Refused(f"invalid YAML: {brief(str(e))}") from None
    except RecursionError:
        raise _Refused(f"YAML nested deeper than {max_depth} levels") from None
    except (ValueError, TypeError, OverflowError, KeyError, AttributeError, IndexError) as e:
        # PyYAML's constructors fail this way on scalars they cannot read (``!!bool maybe``,
        # ``!!timestamp x``, an int over Python's digit limit).
        raise _Refused(f"invalid YAML value ({type(e).__name__}: {brief(str(e))})") from None
    finally:
        if loader is not None:
            loader.dispose()


def parse_yaml(
    text: str | bytes,
    what: str,
    error: type[Exception] = ConfigError,
    *,
    max_depth: int = MAX_DEPTH,
    max_nodes: int = MAX_YAML_NODES,
) -> Any:
    """Parses one YAML document with the limits of the module docstring (safe tags only).

    Raises:
      error: naming ``what`` and the line: syntax errors, unsafe tags, duplicate keys, too deep,
        recursive aliases, or an expansion over ``max_nodes`` nodes.
    """
    try:
        return _yaml(text, max_depth, max_nodes)
    except _Refused as e:
        raise make_error(error, what, str(e)) from None


def load_yaml_file(
    path: str | os.PathLike,
    what: str,
    error: type[Exception] = ConfigError,
    *,
    max_bytes: int | None = MAX_CONFIG_BYTES,
    max_depth: int = MAX_DEPTH,
    max_nodes: int = MAX_YAML_NODES,
) -> Any:
    """Reads and parses YAML file ``path`` (a regular file of at most ``max_bytes``).

    Raises:
      error: naming ``what`` and ``path``.
    """
    raw = read_regular(path, what, error, max_bytes=max_bytes)
    try:
        return _yaml(raw, max_depth, max_nodes)
    except _Refused as e:
        raise make_error(error, what, f"{brief_path(path)}: {e}") from None


__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_DEPTH",
    "MAX_YAML_NODES",
    "load_json",
    "load_yaml_file",
    "parse_json",
    "parse_yaml",
]
