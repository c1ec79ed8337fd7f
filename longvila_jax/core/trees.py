"""Nested-dict trees: the parameter trees of checkpoints (Orbax metadata, ``nnx`` pure dicts).

One set of helpers for what the converters, the checks and the trainer all do: walk the leaves
of a nested mapping with their key paths, build a nested dict back from paths, map over leaves
with their paths, and the trainer's ``"a/b/c"`` flat names. A leaf is anything that is not a
``Mapping``; order is the mappings' own (insertion) order, depth first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

Path = tuple[Any, ...]


def leaves(tree: Mapping, prefix: Path = ()) -> Iterator[tuple[Path, Any]]:
    """Yields ``(key path, leaf)`` depth first; keys are kept as they are."""
    for key, value in tree.items():
        path = (*prefix, key)
        if isinstance(value, Mapping):
            yield from leaves(value, path)
        else:
            yield path, value


def flatten(tree: Mapping) -> dict[tuple[str, ...], Any]:
    """``{("a", "b"): leaf}`` with every key as a string (``nnx`` lists have int keys)."""
    return {tuple(map(str, path)): leaf for path, leaf in leaves(tree)}


def unflatten(items: Iterable[tuple[Path, Any]]) -> dict:
    """The nested dict holding each ``(path, leaf)`` (inverse of :func:`leaves`)."""
    out: dict = {}
    for path, value in items:
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def map_with_path(tree: Mapping, fn: Callable[[Path, Any], Any], prefix: Path = ()) -> dict:
    """The same nested structure with every leaf replaced by ``fn(path, leaf)``."""
    return {
        k: map_with_path(v, fn, (*prefix, k)) if isinstance(v, Mapping) else fn((*prefix, k), v)
        for k, v in tree.items()
    }


def to_names(tree: Mapping) -> dict[str, Any]:
    """``{"a/b/c": leaf}``: the trainer's flat parameter names."""
    return {"/".join(map(str, path)): leaf for path, leaf in leaves(tree)}


def from_names(flat: Mapping[str, Any]) -> dict:
    """``{"a/b/c": x}`` -> ``{"a": {"b": {"c": x}}}`` (inverse of :func:`to_names`)."""
    return unflatten((name.split("/"), value) for name, value in flat.items())


__all__ = ["flatten", "from_names", "leaves", "map_with_path", "to_names", "unflatten"]
