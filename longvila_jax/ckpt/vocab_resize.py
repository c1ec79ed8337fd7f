"""Stage 1's special tokens and embedding resize, as VILA's trainer does them.

Before stage 1 trains, VILA's ``train.py`` (NVlabs/VILA main b760c34, ``llava/train/train.py``
around l.743-758; the Aug-2024 ``LongVILA`` branch 386d350 has only the pad part) fixes the
plain LLM's tokenizer:

1. no BOS token: add ``[BOS]`` as the BOS token;
2. always: ``pad_token = unk_token``; if that leaves no pad token, add ``[PAD]`` as the pad.

Each addition goes through ``smart_tokenizer_and_embedding_resize`` (same file): the LLM's
tables (input embedding and ``lm_head``; one table when tied) are resized to
``len(tokenizer)`` (truncated when the checkpoint's table is padded past the tokenizer, as
Qwen2's 152064 rows are), and the last ``n`` new rows of each are set to the mean of the rows
before them. Llama-3 thus gets one ``[PAD]`` row (128257 rows) and Qwen2 ``[BOS]`` and
``[PAD]`` (151646 + 2 = 151648 rows), the row counts of the LongVILA releases (longvila.md
section 3.3).

The resize happens here on the stored HF tensors, before the usual name and shape checks:
``ResizedWeights`` is a view of the source ``WeightSet`` whose table tensors have the new row
count, so the import streams, checks and records the resized model like any other.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from longvila_jax.ckpt.safetensors_io import TensorInfo, WeightSet
from longvila_jax.config.base import ConfigError
from longvila_jax.core.errors import CheckpointError
from longvila_jax.core.safe_load import load_json, parse_json

# HF names of the vocabulary tables (``lm_head`` is absent when the embeddings are tied).
TABLES = ("model.embed_tokens.weight", "lm_head.weight")
BOS, PAD = "[BOS]", "[PAD]"


@dataclass(frozen=True)
class Resize:
    """One ``smart_tokenizer_and_embedding_resize`` call: the table becomes ``rows`` rows
    and its last ``new`` rows are the mean of the ``rows - new`` rows before them."""

    rows: int
    new: int


@dataclass
class TokenChanges:
    """What the import did to a tokenizer.

    ``resizes``: the table resizes in order; ``added``: new token -> id (``[BOS]``,
    ``[PAD]``, and the media tokens the import adds after them); ``special``: the
    special-token attributes that changed (``bos_token``, ``pad_token``) -> new value.
    """

    resizes: list[Resize] = field(default_factory=list)
    added: dict[str, int] = field(default_factory=dict)
    special: dict[str, str | None] = field(default_factory=dict)

    @property
    def rows(self) -> int | None:
        """Rows of the resized table, None when the table is not resized."""
        return self.resizes[-1].rows if self.resizes else None

    @property
    def changed(self) -> bool:
        """Whether the tokenizer differs from the source's (its files must be rewritten)."""
        return bool(self.resizes or self.added or self.special)


def add_stage1_tokens(tokenizer) -> TokenChanges:
    """Applies VILA's stage-1 BOS/PAD rule to ``tokenizer`` in place (see the module docstring).

    Returns:
      The changes, for the weights (``ResizedWeights``) and the saved tokenizer files.
    """
    changes = TokenChanges()
    pad_before = tokenizer.pad_token

    def add(attr: str, token: str) -> None:
        n = tokenizer.add_special_tokens({attr: token})
        changes.resizes.append(Resize(len(tokenizer), n))
        changes.special[attr] = token
        if n:
            changes.added[token] = tokenizer.convert_tokens_to_ids(token)

    if tokenizer.bos_token is None:
        add("bos_token", BOS)
    # The pad is always the unknown token (none for Llama-3 and Qwen2): [PAD] then.
    tokenizer.pad_token = tokenizer.unk_token
    if tokenizer.pad_token is None:
        add("pad_token", PAD)
    elif tokenizer.pad_token != pad_before:
        changes.special["pad_token"] = tokenizer.pad_token
    return changes


def check_resizes(rows: int, resizes: Sequence[Resize]) -> None:
    """Refuses a resize that would need rows neither copied nor averaged.

    HF's ``resize_token_embeddings`` fills rows past the old table with its own random
    initialisation, and VILA overwrites only the last ``new`` of them; a tokenizer that
    already reaches past the table (media tokens of a VILA tokenizer, say) would leave such
    rows, so it is refused rather than given arbitrary values.

    Raises:
      ConfigError(tokenizer): naming the rows.
    """
    for r in resizes:
        if r.rows - r.new > rows:
            raise ConfigError(
                "tokenizer",
                f"the tokenizer already has {r.rows - r.new} tokens but the LLM's embedding only "
                f"{rows} rows; the stage-1 [BOS]/[PAD] resize would leave rows {rows}.."
                f"{r.rows - r.new - 1} uninitialised (import with the resize turned off, or "
                "use the LLM's own tokenizer)",
            )
        rows = r.rows


def resize_table(table: np.ndarray, resizes: Sequence[Resize]) -> np.ndarray:
    """[V, D] table -> [V', D] after ``resizes`` (``check_resizes`` passed), same dtype.

    The new rows of each step are the mean of all rows before them (including the rows
    averaged by an earlier step), accumulated in float64 and rounded once to the table's
    dtype; the rows kept from ``table`` are copied bit for bit.
    """
    if not resizes:
        return table
    out = np.empty((resizes[-1].rows, table.shape[1]), table.dtype)
    valid = min(table.shape[0], out.shape[0])
    out[:valid] = table[:valid]
    for r in resizes:
        keep = r.rows - r.new
        if r.new:
            mean = out[:keep].mean(axis=0, dtype=np.float64)
            out[keep : r.rows] = mean.astype(table.dtype)
    return out


class ResizedWeights:
    """A ``WeightSet`` whose vocabulary tables read as resized by ``resizes``.

    Every other tensor, and every attribute of the set, is the source's. ``plan()`` reports
    the new shapes and ``index_text`` is the source's index with ``metadata`` sizes updated
    (written as HF writes it), so a project checkpoint records the resized layout and exports
    it (``vila_export`` checks the recorded shapes against ``model.yaml``).
    """

    def __init__(self, base: WeightSet, resizes: Sequence[Resize]):
        self.base = base
        self.resizes = list(resizes)
        self.rows = self.resizes[-1].rows
        self.tables = [n for n in TABLES if n in base.where]

    def __getattr__(self, name: str):
        # Everything not overridden (names, where, directory, is_subset ...) is the source's.
        return getattr(self.base, name)

    def info(self, name: str) -> TensorInfo:
        info = self.base.info(name)
        if name not in self.tables:
            return info
        shape = (self.rows, *info.shape[1:])
        size = math.prod(shape) * info.np_dtype.itemsize
        return replace(info, shape=shape, end=info.start + size)

    def read(self, name: str) -> np.ndarray:
        array = self.base.read(name)
        if name not in self.tables:
            return array
        return resize_table(array, self.resizes)

    def plan(self) -> dict:
        """The source's file layout with the tables' new shapes."""
        plan = self.base.plan()
        for f in plan["files"]:
            for entry in f["tensors"]:
                if entry[0] in self.tables:
                    entry[2] = list(self.info(entry[0]).shape)
        return plan

    @property
    def index_text(self) -> str | None:
        text = self.base.index_text
        if text is None:
            return None
        data = parse_json(text, f"{self.base.directory}: index", CheckpointError)
        meta = data.get("metadata")
        for name in self.tables if isinstance(meta, dict) else ():
            old = self.base.info(name)
            elems = (self.rows - old.shape[0]) * math.prod(old.shape[1:])
            if isinstance(meta.get("total_size"), int):
                meta["total_size"] += elems * old.np_dtype.itemsize
            if isinstance(meta.get("total_parameters"), int):
                meta["total_parameters"] += elems
        return json.dumps(data, indent=2, sort_keys=True) + "\n"


def update_tokenizer_files(folder: Path, changes: TokenChanges, saved: Sequence[str]) -> None:
    """Brings the legacy tokenizer files that ``save_pretrained`` did not rewrite in line.

    Files written by transformers 4 (``special_tokens_map.json``, ``added_tokens.json``) are
    read by transformers on load and override ``tokenizer_config.json``: a copied stale
    ``special_tokens_map.json`` would bring the old pad token back. Each such file present in
    ``folder`` and absent from ``saved`` gets the new special tokens or added tokens.
    """
    files = {"special_tokens_map.json": changes.special, "added_tokens.json": changes.added}
    for name, edits in files.items():
        path = folder / name
        if name in saved or not path.is_file() or not edits:
            continue
        # Copied from the source folder: read with the checked loader like its other JSON.
        data = load_json(path, f"tokenizer.{name}", ConfigError, root=folder)
        data.update(edits)
        path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


__all__ = [
    "BOS",
    "PAD",
    "Resize",
    "ResizedWeights",
    "TokenChanges",
    "add_stage1_tokens",
    "check_resizes",
    "resize_table",
    "update_tokenizer_files",
]
