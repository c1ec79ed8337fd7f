"""Serialized inputs for the fuzz suite: JSON and YAML text of (edited) documents, byte-level
edits of it (flips, insertions, deletions, truncation, duplicated lines: duplicate keys,
hostile snippets: unsafe tags, aliases, NaN, ``1e400``, deep nesting, non-UTF-8 bytes) and
whole hostile documents (alias bombs, recursive aliases, several documents).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence

import yaml
from hypothesis import reject
from hypothesis import strategies as st

from helpers.fuzz_mutations import BOOLS, NO_VOCAB, SPECIAL_KEYS, Vocab, edits, ints, once, pick


@st.composite
def json_text(draw, doc) -> bytes:
    """``doc`` as JSON (NaN/Infinity literals included; lone surrogates as raw bytes or escapes)."""
    indent = pick(draw, (1, None))
    try:
        text = json.dumps(doc, indent=indent, ensure_ascii=draw(BOOLS), allow_nan=True)
    except (ValueError, RecursionError, TypeError):
        reject()
    return text.encode("utf-8", "surrogatepass")


class _Dumper(yaml.SafeDumper):
    """Writes ints too long for ``str()`` in YAML 1.1 base 60 (``1:0:59``), as a hostile file
    can."""


class _CDumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):
    """The same with libyaml's emitter (faster; it cannot write lone surrogates)."""


def _represent_int(dumper: yaml.SafeDumper, x: int):
    if abs(x).bit_length() < 10_000:
        return dumper.represent_int(x)
    digits, rest = [], abs(x)
    while rest:
        rest, d = divmod(rest, 60)
        digits.append(str(d))
    text = ("-" if x < 0 else "") + ":".join(reversed(digits))
    return dumper.represent_scalar("tag:yaml.org,2002:int", text)


_Dumper.add_representer(int, _represent_int)
_CDumper.add_representer(int, _represent_int)


@st.composite
def yaml_text(draw, doc) -> bytes:
    """``doc`` as YAML (block or flow style; shared subtrees become anchors and aliases)."""
    options = dict(
        default_flow_style=pick(draw, (False, None, True)),
        sort_keys=False,
        allow_unicode=draw(BOOLS),
    )
    try:
        try:
            text = yaml.dump(doc, Dumper=_CDumper, **options)
        except UnicodeEncodeError:
            text = yaml.dump(doc, Dumper=_Dumper, **options)
    except (yaml.YAMLError, RecursionError, TypeError):
        reject()
    return text.encode("utf-8", "surrogatepass")


def alias_bomb(levels: int = 9, width: int = 9, key: str = "llm") -> bytes:
    """A "billion laughs" document: ``width ** levels`` nodes once expanded."""
    lines = ["b0: &b0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"b{i}: &b{i} [" + ", ".join([f"*b{i - 1}"] * width) + "]")
    lines.append(f"{key}: *b{levels - 1}")
    return ("\n".join(lines) + "\n").encode()


DEEP = 3000
JSON_VALUES = (b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"9" * 5000, b"-1", b"1.5")
JSON_VALUES += (b"18446744073709551616", b'"\\ud800"', b'"\\u0000"', b"[" * DEEP, b"true")
JSON_VALUES += (b"[" * 2000 + b"]" * 2000, b'{"a":' * 2000 + b"1" + b"}" * 2000, b"null")
JSON_VALUES += (b"{}", b"[]", b'""', b"\xff", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"\x00", b",")
JSON_DOCS = (b"", b"[]", b"null", b"[" * DEEP + b"]" * DEEP, b'{"a": 1, "a": 2}', b"\xff\xfe")
JSON_DOCS += (b'{"a":' * DEEP, b"NaN", b'"\\ud800"', b"1" * 5000, b"\xef\xbb\xbf{}")

YAML_VALUES = (b"!!python/object/apply:os.system ['true']", b"!!python/name:os.system", b"*x")
YAML_VALUES += (b"!!python/object/new:dict {}", b"!!binary AAAA", b"!!set {a: null}", b".nan")
YAML_VALUES += (b"!!omap [a: 1]", b"!!timestamp 2001-12-14", b"!!float nan", b"!!str 3", b".inf")
YAML_VALUES += (b"&x 5", b"[*x, *x]", b"{<<: *x}", b"*undefined", b"-.inf", b"0o777", b"~")
YAML_VALUES += (b"0x7fffffffffffffffffff", b"1_000", b"1e400", b"9" * 5000, b"yes", b"no", b"on")
YAML_VALUES += (b'"\\ud800"', b'"\\x00"', b"|\n  block", b"[" * 200, b"{a: " * 100, b"- - -")
YAML_VALUES += (b"!!int 1e400", b"!!float x", b"!!null x", b"!!bool maybe", b"!!map []", b"\t")
YAML_VALUES += (b"1:" * 3000 + b"1", b"!!timestamp x")  # 1:...:1 is a YAML 1.1 base-60 int
YAML_VALUES += (b"&r [*r]", b"? [a, b]", b"\xff", b"\xef\xbb\xbf", b"'unterminated", b":", b"%")
YAML_DOCS = (alias_bomb(), alias_bomb(4, 20), b"a: &a [*a]\n", b"---\na: 1\n---\nb: 2\n", b"")
YAML_DOCS += (b"%TAG ! tag:yaml.org,2002:python/object/apply:\n--- !os.system ['true']\n", b"[]")
YAML_DOCS += (b"[" * DEEP + b"]" * DEEP, b"a: " + b"{b: " * 1000 + b"1" + b"}" * 1000, b"- 1\n")
YAML_DOCS += (b"\xef\xbb\xbfllm: {}\n", b"a: 1\na: 2\n", b"? !!python/tuple [1]\n: 1\n", b"\x00")


BYTE_OPS = ("snippet", "line", "flip", "insert", "delete", "truncate", "dup_line", "del_line")
BYTES = st.binary(min_size=1, max_size=8)


@st.composite
def byte_edits(
    draw, data: bytes, snippets: Sequence[bytes], lines: st.SearchStrategy, max_ops: int = 3
) -> bytes:
    """``data`` after 1..max_ops byte-level edits."""
    for _ in range(draw(ints(1, max_ops))):
        op = pick(draw, BYTE_OPS)
        n = len(data)
        pos = draw(ints(0, n))
        if op == "snippet":
            data = data[:pos] + pick(draw, snippets) + data[pos:]
        elif op == "flip" and n:
            pos = min(pos, n - 1)
            data = data[:pos] + bytes([draw(ints(0, 255))]) + data[pos + 1 :]
        elif op == "insert":
            data = data[:pos] + draw(BYTES) + data[pos:]
        elif op == "delete":
            end = draw(ints(pos, min(n, pos + 64)))
            data = data[:pos] + data[end:]
        elif op == "truncate":
            data = data[:pos]
        else:  # line operations
            rows = data.split(b"\n")
            i = draw(ints(0, len(rows) - 1))
            if op == "line":
                indent = rows[i][: len(rows[i]) - len(rows[i].lstrip(b" "))]
                rows.insert(i, indent + draw(lines))
            elif op == "dup_line":
                rows.insert(i, rows[i])
            elif op == "del_line":
                del rows[i]
            data = b"\n".join(rows)
    return data


def json_lines(vocab: Vocab) -> st.SearchStrategy:
    """``"key": value,`` lines (duplicate keys when ``key`` is already there)."""
    key = st.sampled_from(vocab.keys or SPECIAL_KEYS).map(lambda k: json.dumps(k).encode())
    line = st.builds(lambda k, v: k + b": " + v + b",", key, st.sampled_from(JSON_VALUES))
    return once("json_lines", vocab, lambda: line)


def yaml_lines(vocab: Vocab) -> st.SearchStrategy:
    """``key: value`` lines: duplicate keys, tags, anchors, aliases, merge keys."""
    key = st.sampled_from(vocab.keys or SPECIAL_KEYS + ("<<",)).map(lambda k: k.encode())
    value = st.sampled_from(YAML_VALUES + (b"&x [1, 2]", b"*x", b"{}"))
    odd = st.sampled_from((b"<<: *x", b"1:" * 3000 + b"1: x", b"? [a, b]\n: 1"))
    line = st.builds(lambda k, v: k + b": " + v, key, value) | odd
    return once("yaml_lines", vocab, lambda: line)


# How a document is mutated: structured edits, same-kind leaf tweaks (they keep the structure
# valid so values reach the semantic checks), byte edits, both, or a hostile whole document.
KINDS = ("edit", "tweak", "bytes", "both", "edit", "tweak", "doc")


@st.composite
def json_inputs(draw, doc, vocab: Vocab = NO_VOCAB) -> bytes:
    """Bytes of a mutated JSON document: structured edits, byte edits, both, or a hostile doc."""
    kind = pick(draw, KINDS)
    if kind == "doc":
        return pick(draw, JSON_DOCS)
    if kind == "tweak":
        doc = draw(edits(doc, vocab, max_ops=2, ops=("tweak",)))
    elif kind in ("edit", "both"):
        doc = draw(edits(doc, vocab))
    text = draw(json_text(doc))
    if kind in ("bytes", "both"):
        text = draw(byte_edits(text, JSON_VALUES, json_lines(vocab)))
    return text


@functools.lru_cache(maxsize=16)
def _parsed(text: bytes):
    return yaml.safe_load(text)  # never mutated: ``edits`` works on a deep copy


@st.composite
def yaml_inputs(draw, text: bytes, vocab: Vocab = NO_VOCAB) -> bytes:
    """Bytes of a mutated YAML file (``text``: the valid original, comments included)."""
    kind = pick(draw, KINDS)
    if kind == "doc":
        return pick(draw, YAML_DOCS)
    if kind == "tweak":
        ops = ("tweak",)
        text = draw(yaml_text(draw(edits(_parsed(text), vocab, 2, yaml_only=True, ops=ops))))
    elif kind in ("edit", "both"):
        text = draw(yaml_text(draw(edits(_parsed(text), vocab, yaml_only=True))))
    if kind in ("bytes", "both"):
        text = draw(byte_edits(text, YAML_VALUES, yaml_lines(vocab)))
    return text
