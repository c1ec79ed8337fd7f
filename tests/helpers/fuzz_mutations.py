"""Shared strategies of the fuzz suite: hostile values and structured edits of parsed documents.

Every fuzz test feeds a mutation of a valid input to a parser (``_outcome`` says what the
parser may do with it). A structured mutation edits the parsed document at random paths:
same-kind leaf tweaks (a lone surrogate appended to a string, an int made 2**64 or nan),
replacements by random JSON-ish values, deletions, unknown keys, type swaps, deep nesting,
and shared subtrees (written by YAML as anchors and aliases). ``_texts`` serializes the result
and adds byte-level mutations.
"""

from __future__ import annotations

import copy
import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# LONGVILA_FUZZ_EXAMPLES lowers the count for a quick local run; CI runs the default.
FUZZ = settings(
    max_examples=int(os.environ.get("LONGVILA_FUZZ_EXAMPLES", "2000")),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.large_base_example,
    ],
)

HUGE_INTS = (0, -1, 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 2**64 + 1, -(2**63))
HUGE_INTS += (-(2**64), 10**30, 10**300)
SPECIAL_FLOATS = (math.nan, math.inf, -math.inf, -0.0, 5e-324, 1e-300, 1.7976931348623157e308)
SPECIAL_FLOATS += (-1e308, 1e-9, 0.5, 1e19)
LONG = "x" * 5000
SPECIAL_STRINGS = ("", " ", "\ud800", "\udfff", "a\x00b", LONG, "NaN", "1e400", "inf", "-1")
SPECIAL_STRINGS += ("0x10", "true", "null", "~", "<image>", "<video>", "<|im_end|>", "\u202e")
SPECIAL_STRINGS += ("../../etc/passwd", "/etc/passwd", "/dev/zero", "/proc/self/mem", ".", "..")
SPECIAL_STRINGS += ("a/../../b", "\n", "%s%n{0}", "{}", "[]", "é", "linear", "default", "dynamic")
SPECIAL_KEYS = ("", "__metadata__", "\ud800", "x" * 300, "a.b", "0", "<<", "type", "vision_config")


@dataclass(frozen=True)
class Vocab:
    """Domain tokens mixed into the random keys and values (field names, valid enum values);
    ``fields``: hostile values for the leaves under one key (regexes ``re`` chokes on for
    ``trainable``, tiny floats for ``fps``), which tweaks use half of the time."""

    keys: tuple = ()
    values: tuple = ()
    fields: dict = field(default_factory=dict)


NO_VOCAB = Vocab()


# Strategies are built once per vocabulary: building ``st.recursive`` anew for every draw
# costs more than the parsers under test.
_BUILT: dict[tuple[str, int], st.SearchStrategy] = {}


def once(kind: str, vocab: Vocab, build) -> st.SearchStrategy:
    key = (kind, id(vocab))
    if key not in _BUILT:
        _BUILT[key] = build()
    return _BUILT[key]


def scalars(vocab: Vocab = NO_VOCAB) -> st.SearchStrategy:
    options = [
        st.none(),
        st.booleans(),
        st.integers(),
        st.sampled_from(HUGE_INTS),
        st.floats(),
        st.sampled_from(SPECIAL_FLOATS),
        st.text(max_size=12),
        st.sampled_from(SPECIAL_STRINGS),
    ]
    if vocab.values:
        options.insert(0, st.sampled_from(vocab.values).map(copy.deepcopy))  # edits mutate it
    return once("scalars", vocab, lambda: st.one_of(options))


def keys(vocab: Vocab = NO_VOCAB) -> st.SearchStrategy:
    return once(
        "keys",
        vocab,
        lambda: st.one_of(
            st.sampled_from(vocab.keys or SPECIAL_KEYS),
            st.text(max_size=8),
            st.sampled_from(SPECIAL_KEYS),
        ),
    )


def values(vocab: Vocab = NO_VOCAB) -> st.SearchStrategy:
    """JSON-ish values: huge/negative ints, nan/inf, long strings, lone surrogates, nesting."""
    return once(
        "values",
        vocab,
        lambda: st.recursive(
            scalars(vocab),
            lambda inner: (
                st.lists(inner, max_size=3) | st.dictionaries(keys(vocab), inner, max_size=3)
            ),
            max_leaves=6,
        ),
    )


@functools.lru_cache(maxsize=4096)
def ints(lo: int, hi: int) -> st.SearchStrategy:
    return st.integers(lo, hi)


BOOLS = st.booleans()


def pick(draw, seq: Sequence):
    """``seq[i]`` for a drawn ``i`` (shrinks to the first item): cheaper than building a new
    ``sampled_from`` for every draw."""
    return seq[draw(ints(0, len(seq) - 1))]


def _nodes(doc) -> list[tuple[tuple, object]]:
    """(path, node) of every node of ``doc``, root first (iterative; stops at 2,000 nodes)."""
    out, stack, seen = [], [((), doc)], set()
    while stack and len(out) < 2000:
        path, node = stack.pop()
        out.append((path, node))
        if id(node) in seen:  # a shared subtree: listed once
            continue
        if isinstance(node, dict):
            seen.add(id(node))
            stack.extend((path + (k,), v) for k, v in reversed(list(node.items())))
        elif isinstance(node, list):
            seen.add(id(node))
            stack.extend((path + (i,), v) for i, v in reversed(list(enumerate(node))))
    return out


def _parent(doc, path: tuple):
    node = doc
    for k in path[:-1]:
        node = node[k]
    return node


def _set(doc, path: tuple, new):
    if not path:
        return new
    _parent(doc, path)[path[-1]] = new
    return doc


def nest(value, depth: int, as_list: bool):
    for _ in range(depth):
        value = [value] if as_list else {"k": value}
    return value


def _text(v) -> str:
    """``str(v)``, cut to 100 characters (``BIG`` has too many digits for ``str``)."""
    try:
        return str(v)[:100]
    except ValueError:
        return "9" * 100


def _retypes(v) -> list:
    out = [None, True, 0, "", -1, [v], {"value": v}, _text(v)]
    if isinstance(v, bool):
        out += [int(v), "yes"]
    elif isinstance(v, int):
        f = float(v) if v.bit_length() < 1024 else math.inf
        out += [-v, v * 2**64, f, f + 0.5, v - 1]
    elif isinstance(v, float):
        out += [-v, v * 1e300, int(v) if math.isfinite(v) else 2**64]
    elif isinstance(v, str):
        out += [len(v), (v * 1000)[:20000], v + "\ud800", v.upper(), [v, v]]
    elif isinstance(v, list):
        out += [{str(i): x for i, x in enumerate(v)}, v[::-1], (v * 50)[:500], v[:1], []]
    elif isinstance(v, dict):
        out += [list(v.values()), list(v), {}, {str(k) + "_": x for k, x in v.items()}]
    return out


# Over Python's 4,300-digit str() limit; YAML writes it in a few KB (YAML 1.1 base 60, see
# ``yaml_text``); JSON cannot hold it, so only YAML edits use it.
BIG = 60**3000 + 1


def _tweaks(v, big: bool = False) -> list:
    """Hostile values of the same kind as leaf ``v``: they pass type checks, then bite deeper."""
    if isinstance(v, bool):
        return [not v, int(v)]
    if isinstance(v, int | float):
        return [*HUGE_INTS, *SPECIAL_FLOATS, v + 1, v - 1, -v, v * 2**64] + [BIG] * big
    if isinstance(v, str):
        out = [v + "\ud800", "\ud800" + v, (v * 1000)[:20000], v + "\x00", "x" * 300, LONG]
        return out + ["", " ", "../" + v, "/" + v, v + "/..", v + "<image>", v + "<|im_end|>"]
    return [None, "", 0]


OPS = ("tweak", "replace", "delete", "add", "retype", "nest", "share", "tweak")


@st.composite
def edits(draw, doc, vocab: Vocab = NO_VOCAB, max_ops: int = 3, yaml_only: bool = False, ops=OPS):
    """``doc`` after 1..max_ops structured edits (``ops``) at random paths.

    ``yaml_only`` adds what only YAML can hold: shared subtrees (anchors and aliases, possibly
    recursive) and ints over Python's ``str()`` digit limit. Without it a shared subtree is
    copied, so the result is a tree, as ``json.loads`` returns.
    """
    doc = copy.deepcopy(doc)
    for _ in range(draw(ints(1, max_ops))):
        nodes = _nodes(doc)
        path, node = pick(draw, nodes)
        op = pick(draw, ops)
        if op == "tweak":  # a leaf: keep its kind (or use its field's values), make it hostile
            leaves = [(p, n) for p, n in nodes if not isinstance(n, dict | list)] or nodes
            path, node = pick(draw, leaves)
            names = [k for k in path if isinstance(k, str) and k in vocab.fields]
            options = _tweaks(node, yaml_only)
            if names and draw(BOOLS):
                options = vocab.fields[names[-1]]
            doc = _set(doc, path, copy.deepcopy(pick(draw, options)))
        elif op == "replace":
            doc = _set(doc, path, draw(values(vocab)))
        elif op == "retype":
            doc = _set(doc, path, pick(draw, _retypes(node)))
        elif op == "nest":
            depth = pick(draw, (1, 2, 16, 63, 64, 65, 100))
            doc = _set(doc, path, nest(node, depth, draw(BOOLS)))
        elif op == "share":  # YAML writes a shared subtree as an anchor and aliases
            sources = [n for p, n in nodes if p != path[: len(p)]]
            if sources:
                source = pick(draw, sources)
                doc = _set(doc, path, source if yaml_only else copy.deepcopy(source))
        elif op == "add":
            if isinstance(node, dict):
                node[draw(keys(vocab))] = draw(values(vocab))
            elif isinstance(node, list):
                node.insert(draw(ints(0, len(node))), draw(values(vocab)))
            else:
                doc = _set(doc, path, {draw(keys(vocab)): node})
        elif not path:  # delete the root
            doc = pick(draw, (None, [], "", 0, {}))
        else:
            del _parent(doc, path)[path[-1]]
    return doc
