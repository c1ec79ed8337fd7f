"""``provenance.json`` of a project checkpoint: the checked reader and its schema.

Export writes the files this record names (shard files, index, the copied HF files), so a
tampered record could otherwise place a file anywhere the user can write (say a ``.pth`` in
site-packages, which Python runs at start-up). The whole structure is therefore validated
when it is read, before anyone uses a value from it, with errors naming the field
(``provenance.components.llm.plan.files[0].name``):

- every file name is a plain name (``safe_paths.check_name``) with the right suffix, and every
  HF file a short relative path of plain names (``check_relpath``); no duplicates;
- tensor entries are ``[name, dtype code, shape]`` with a known dtype and a bounded size;
- ``index_text`` (the verbatim HF index, kept for byte-identical export) parses with the checked
  JSON loader and its ``weight_map`` names exactly the plan's tensors and files;
- ``unused`` tensors are tensors of the plan; the source config has the sections export reads.

The schema (all keys optional except ``format`` and ``source``; the last three come together)::

    {"format": FORMAT, "source": {"layout", "path", "vision_path", "top_file", "notes"},
     "source_model_config": {...}, "hf_files": [...],
     "components": {"llm" | "vision_tower" | "mm_projector":
        {"siglip_prefix": bool, "plan": {"index": name | null, "files": [...]},
         "index_text": str | null, "unused": [tensor names]}}}
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any

from longvila_jax.ckpt.safetensors_io import DTYPES, INDEX_SUFFIX, MAX_ENTRIES, MAX_NDIM
from longvila_jax.core.errors import CheckpointError, brief
from longvila_jax.core.safe_load import MAX_CONFIG_BYTES, load_json, parse_json
from longvila_jax.core.safe_paths import check_name, check_relpath

FORMAT = "longvila_jax.ckpt/1"
COMPONENTS = ("llm", "vision_tower", "mm_projector")
MAX_FILES = 10_000  # shard files per component, and HF files per checkpoint
MAX_TENSOR_NAME = 1024
MAX_TENSOR_BYTES = 1 << 40  # 1 TiB: far above any real tensor, far below a sparse-file bomb
_TOP_KEYS = {"format", "source", "source_model_config", "hf_files", "components"}
_LAYOUT_KEYS = ("source_model_config", "hf_files", "components")
_SOURCE_KEYS = {"layout", "path", "vision_path", "top_file", "notes"}
_RECORD_KEYS = {"siglip_prefix", "plan", "index_text", "unused"}
_LAYOUT_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")


def _fail(what: str, message: str) -> CheckpointError:
    return CheckpointError(f"{what}: {message}")


def _type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _dict(value: Any, what: str, keys: set[str] | None = None, required=()) -> dict:
    """``value`` as an object with only ``keys`` (when given) and all of ``required``."""
    if not isinstance(value, dict):
        raise _fail(what, f"must be an object, not {_type(value)}")
    if keys is not None:
        unknown = sorted(set(value) - keys)
        if unknown:
            raise _fail(f"{what}.{brief(unknown[0])[1:-1]}", "unknown field")
    for key in required:
        if key not in value:
            raise _fail(f"{what}.{key}", "missing")
    return value


def _list(value: Any, what: str, max_len: int) -> list:
    if not isinstance(value, list):
        raise _fail(what, f"must be a list, not {_type(value)}")
    if len(value) > max_len:
        raise _fail(what, f"{len(value)} entries exceed the cap of {max_len}")
    return value


def _str(value: Any, what: str, max_len: int = 4096) -> str:
    if not isinstance(value, str):
        raise _fail(what, f"must be a string, not {_type(value)}")
    if len(value) > max_len:
        raise _fail(what, f"a string of {len(value)} characters exceeds the cap of {max_len}")
    return value


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(what, f"must be an integer, not {brief(value)}")
    return value


def _tensor(entry: Any, what: str) -> tuple[str, str, tuple[int, ...]]:
    """One ``[name, dtype, shape]`` plan entry."""
    if not isinstance(entry, list) or len(entry) != 3:
        raise _fail(what, f"must be [name, dtype, shape], not {brief(entry)}")
    name = _str(entry[0], f"{what}[0]", MAX_TENSOR_NAME)
    dtype, shape = entry[1], _list(entry[2], f"{what}[2]", MAX_NDIM)
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _fail(f"{what}[1]", f"unknown dtype {brief(dtype)} (known: {', '.join(DTYPES)})")
    for i, d in enumerate(shape):
        if _int(d, f"{what}[2][{i}]") < 0:
            raise _fail(f"{what}[2][{i}]", f"negative dimension {d}")
    if math.prod(shape) * DTYPES[dtype].itemsize > MAX_TENSOR_BYTES:
        raise _fail(what, f"tensor {brief(name)} of shape {brief(shape)} is implausibly large")
    return name, dtype, tuple(shape)


def validate_plan(plan: Any, what: str) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """Checks a shard plan (``WeightSet.plan()`` format).

    Returns:
      tensor name -> (file name, dtype code, shape).
    """
    _dict(plan, what, {"index", "files"}, ("index", "files"))
    index = plan["index"]
    if index is not None:
        check_name(index, f"{what}.index")
        if not index.endswith(INDEX_SUFFIX):
            raise _fail(f"{what}.index", f"{brief(index)} does not end with {INDEX_SUFFIX}")
    files = _list(plan["files"], f"{what}.files", MAX_FILES)
    if not files or (index is None and len(files) != 1):
        raise _fail(f"{what}.files", "must list one file, or several files with an index")
    out: dict[str, tuple[str, str, tuple[int, ...]]] = {}
    names = set()
    for i, f in enumerate(files):
        at = f"{what}.files[{i}]"
        _dict(f, at, {"name", "metadata", "tensors"}, ("name", "metadata", "tensors"))
        name = check_name(f["name"], f"{at}.name")
        if not name.endswith(".safetensors") or name in names:
            raise _fail(f"{at}.name", f"{brief(name)} is a duplicate or not a .safetensors name")
        names.add(name)
        meta = _dict(f["metadata"], f"{at}.metadata")
        for key, value in meta.items():
            _str(key, f"{at}.metadata", 256)
            _str(value, f"{at}.metadata.{brief(key)[1:-1]}")
        for j, entry in enumerate(_list(f["tensors"], f"{at}.tensors", MAX_ENTRIES)):
            tname, dtype, shape = _tensor(entry, f"{at}.tensors[{j}]")
            if tname in out:
                raise _fail(f"{at}.tensors[{j}]", f"tensor {brief(tname)} is listed twice")
            out[tname] = (name, dtype, shape)
    return out


def _check_index_text(text: str, tensors: Mapping[str, tuple], what: str) -> None:
    """The verbatim index must describe exactly the plan (export writes both)."""
    data = parse_json(text, what, CheckpointError)
    wmap = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wmap, dict):
        raise _fail(f"{what}.weight_map", "missing or not an object")
    if "metadata" in data and not isinstance(data["metadata"], dict):
        raise _fail(f"{what}.metadata", f"must be an object, not {_type(data['metadata'])}")
    for name, fname in wmap.items():
        if name not in tensors:
            raise _fail(f"{what}.weight_map", f"tensor {brief(name)} is not in the plan")
        if fname != tensors[name][0]:
            raise _fail(
                f"{what}.weight_map",
                f"tensor {brief(name)} is mapped to {brief(fname)}, the plan stores it in "
                f"{brief(tensors[name][0])}",
            )
    missing = sorted(set(tensors) - set(wmap))
    if missing:
        raise _fail(f"{what}.weight_map", f"lacks tensor {brief(missing[0])} of the plan")


def validate_record(rec: Any, what: str) -> None:
    """Checks one component's record: plan, verbatim index text, SigLIP spelling, unused."""
    _dict(rec, what, _RECORD_KEYS, tuple(sorted(_RECORD_KEYS)))
    if not isinstance(rec["siglip_prefix"], bool):
        raise _fail(
            f"{what}.siglip_prefix", f"must be a boolean, not {brief(rec['siglip_prefix'])}"
        )
    tensors = validate_plan(rec["plan"], f"{what}.plan")
    text = rec["index_text"]
    if text is not None:
        _str(text, f"{what}.index_text", MAX_CONFIG_BYTES)
        if rec["plan"]["index"] is None:
            raise _fail(f"{what}.index_text", "given, but the plan has no index file")
        _check_index_text(text, tensors, f"{what}.index_text")
    seen = set()
    for i, name in enumerate(_list(rec["unused"], f"{what}.unused", MAX_ENTRIES)):
        if not isinstance(name, str) or name not in tensors or name in seen:
            raise _fail(
                f"{what}.unused[{i}]", f"{brief(name)} is a duplicate or not a tensor of the plan"
            )
        seen.add(name)


def _source(src: Any, what: str) -> None:
    _dict(src, what, _SOURCE_KEYS, ("layout",))
    if not isinstance(src["layout"], str) or not _LAYOUT_RE.fullmatch(src["layout"]):
        raise _fail(f"{what}.layout", f"{brief(src['layout'])} is not a layout name")
    for key in ("path", "vision_path"):
        if key in src:
            _str(src[key], f"{what}.{key}")
    if src.get("top_file") is not None:
        check_name(src["top_file"], f"{what}.top_file")
    for i, note in enumerate(_list(src.get("notes", []), f"{what}.notes", 100)):
        _str(note, f"{what}.notes[{i}]")


def _source_model_config(smc: Any, what: str) -> None:
    """The imported config: export compares the current one with it, section by section."""
    _dict(smc, what, None, ("image_token_id", "vision", "projector", "llm"))
    _int(smc["image_token_id"], f"{what}.image_token_id")
    for section in ("vision", "projector", "llm"):
        _dict(smc[section], f"{what}.{section}")


def _hf_files(files: Any, what: str) -> None:
    seen = set()
    for i, rel in enumerate(_list(files, what, MAX_FILES)):
        check_relpath(rel, f"{what}[{i}]")
        if rel in seen or rel.endswith((".safetensors", INDEX_SUFFIX)):
            raise _fail(f"{what}[{i}]", f"{brief(rel)} is a duplicate or a weight file name")
        seen.add(rel)


def validate(data: Any, where: str = "provenance") -> dict:
    """Checks a parsed provenance record (see the module docstring) and returns it.

    Args:
      data: the parsed JSON.
      where: prefix of the field names in messages (the file, then ``provenance``).

    Raises:
      CheckpointError: naming the first offending field.
    """
    _dict(data, where, _TOP_KEYS, ("format", "source"))
    if data["format"] != FORMAT:
        raise _fail(f"{where}.format", f"unknown checkpoint format {brief(data['format'])}")
    _source(data["source"], f"{where}.source")
    present = [k for k in _LAYOUT_KEYS if k in data]
    if present and len(present) != len(_LAYOUT_KEYS):
        lacking = next(k for k in _LAYOUT_KEYS if k not in data)
        raise _fail(f"{where}.{lacking}", f"missing (it comes with {present[0]})")
    if present:
        _source_model_config(data["source_model_config"], f"{where}.source_model_config")
        _hf_files(data["hf_files"], f"{where}.hf_files")
        comps = _dict(data["components"], f"{where}.components", set(COMPONENTS), COMPONENTS)
        for c in COMPONENTS:
            validate_record(comps[c], f"{where}.components.{c}")
    return data


def read(path: str | os.PathLike) -> dict:
    """Reads ``provenance.json`` with the checked loader and validates it.

    Raises:
      CheckpointError: unreadable, invalid JSON (duplicate keys, too deep ...) or an invalid
        field (named).
    """
    data = load_json(path, "provenance.json", CheckpointError)
    return validate(data, f"{path}: provenance")


__all__ = ["COMPONENTS", "FORMAT", "read", "validate", "validate_plan", "validate_record"]
