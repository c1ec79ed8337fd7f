"""Export a project checkpoint back to the VILA/LongVILA layout it came from.

The layout recorded at import (provenance) is reproduced exactly: the same sub-folders, shard
files and index, tensor names (including the SigLIP ``vision_model.`` spelling), tensor order
inside each file, dtypes (each tensor in the dtype recorded at import, whatever dtype the
project checkpoint stores it in: bf16 for the released LongVILA checkpoints, and a trained
stage's ``final/`` already holds its model's ``param_dtype``), the tensors the model does not
use, and every config and tokenizer file byte for byte. Config fields that changed since
import (``rope_theta`` after context extension, ...) are written into exactly those keys of the
JSON configs; a change the layout cannot express (a different hidden size, say) raises
``ConfigError`` naming the field.

Streaming: all shard files are created up front with their final headers, then parameters are
restored one leaf at a time and each slice is written at its offset, so peak memory is about the
largest stacked parameter. The output directory appears atomically.

The checkpoint is hostile until checked, and all checks run before the output is created:
the integrity manifest, the provenance record (every file name a plain name, the index text
consistent with the plan: ``ckpt.provenance``), the ``hf/`` files against the record, the
stored shapes against ``model.yaml``, and the recorded tensor layout against the model. The
writers refuse any name that is not a plain file name in any case (``safetensors_writer``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from longvila_jax.ckpt import mapping
from longvila_jax.ckpt.checks import FLOAT_CODES, check_stored_params
from longvila_jax.ckpt.integrity import check_hf_files
from longvila_jax.ckpt.orbax_io import (
    ATTR,
    HF_DIR,
    UNUSED_DIR,
    atomic_dir,
    load_leaves,
    read_model_config,
    read_provenance,
    release_freed_memory,
    stored_tree,
    verify_checkpoint,
)
from longvila_jax.ckpt.safetensors_io import DTYPES, CheckpointError, SafetensorsFile
from longvila_jax.ckpt.safetensors_writer import PlanWriter
from longvila_jax.ckpt.vila_import import COMPONENTS, EXPORTABLE
from longvila_jax.config.base import ConfigError, to_dict
from longvila_jax.config.model import ModelConfig
from longvila_jax.core import trees
from longvila_jax.core.errors import brief
from longvila_jax.core.safe_load import load_json
from longvila_jax.core.safe_paths import copy_tree

# Settings of this port that have no VILA JSON field (the default is re-derived on import).
_NOT_IN_JSON = {("projector", "token_order")}
_TOP_FILES = ("config.json", "config_vila_style.json")


def config_edits(source: Mapping, cfg: ModelConfig) -> dict[tuple[str, str], object]:
    """The JSON-backed fields of ``cfg`` that differ from the imported config.

    Raises:
      ConfigError: a field changed that the VILA layout cannot express.
    """
    cur = to_dict(cfg)
    if cur["image_token_id"] != source["image_token_id"]:
        raise ConfigError("image_token_id", "changed since import; the tokenizer defines it")
    edits = {}
    for section in ("vision", "projector", "llm"):
        for key, value in cur[section].items():
            old = source[section].get(key)
            if value == old or (section, key) in _NOT_IN_JSON:
                continue
            if (section, key) not in EXPORTABLE:
                raise ConfigError(
                    f"{section}.{key}",
                    f"changed from {brief(old)} to {brief(value)} since import; the recorded "
                    "VILA layout cannot express this change",
                )
            edits[(section, key)] = value
    return edits


def _set_llm(d: dict, key: str, cfg: ModelConfig) -> None:
    lc = cfg.llm
    if key in ("rope_theta", "rope_scaling"):
        if isinstance(d.get("rope_parameters"), dict):  # else the legacy keys
            rp = dict(d["rope_parameters"])
            rp["rope_theta"] = lc.rope_theta
            if lc.rope_scaling is None:
                rp["rope_type"] = "default"
                rp.pop("factor", None)
            else:
                rp["rope_type"] = "linear"
                rp["factor"] = lc.rope_scaling.factor
            d["rope_parameters"] = rp
        elif key == "rope_theta":
            d["rope_theta"] = lc.rope_theta
        else:
            s = lc.rope_scaling
            d["rope_scaling"] = None if s is None else {"type": "linear", "factor": s.factor}
    else:
        d[key] = getattr(lc, key)


def apply_config_edits(configs: dict[str, dict], edits: Mapping, cfg: ModelConfig) -> set[str]:
    """Applies ``edits`` to the parsed JSON files (relative path -> dict); returns those changed."""
    changed = set()
    for (section, key), value in edits.items():
        targets: list[tuple[str, dict]] = []
        for top in _TOP_FILES:
            if top not in configs:
                continue
            t = configs[top]
            if section == "vision" and key == "select_layer":
                t["mm_vision_select_layer"] = value
                changed.add(top)
                continue
            sub = t.get("llm_cfg" if section == "llm" else "vision_tower_cfg")
            if isinstance(sub, dict):
                targets.append((top, sub))
        comp = "llm/config.json" if section == "llm" else "vision_tower/config.json"
        if comp in configs and key != "select_layer":
            targets.append((comp, configs[comp]))
        for fname, d in targets:
            if section == "llm":
                _set_llm(d, key, cfg)
            else:
                sub = d.get("vision_config")
                if sub is not None and not isinstance(sub, dict):
                    raise CheckpointError(f"{fname}: vision_config must be an object")
                (sub or d)[key] = value
            changed.add(fname)
    return changed


def _write_component(
    ckpt: Path, out: Path, comp: str, cfg: ModelConfig, rec: dict, tree, group_bytes: int
) -> None:
    plan = rec["plan"]
    dtypes = {n: DTYPES[dt] for f in plan["files"] for n, dt, _ in f["tensors"]}
    out.mkdir(exist_ok=True)
    writer = PlanWriter(out, plan, rec["index_text"])
    try:
        if rec["unused"]:
            st = SafetensorsFile(ckpt / UNUSED_DIR / f"{comp}.safetensors", ckpt)
            for name in rec["unused"]:
                writer.write(name, st.read(name))
        for group in _groups(tree[ATTR[comp]], group_bytes):
            loaded = load_leaves(ckpt, comp, [p for p, _ in group], tree)
            for path, (shape, _) in group:
                _write_leaf(writer, cfg, comp, rec, path, shape, loaded.pop(path), dtypes, out)
            del loaded
            release_freed_memory()
        writer.close()
    except BaseException:
        writer.abort()
        raise


def _write_leaf(writer, cfg, comp, rec, path, shape, leaf, dtypes, out) -> None:
    """Writes every HF tensor of one parameter leaf (one per layer when stacked)."""
    prefix = rec["siglip_prefix"]
    try:
        names = [(mapping.hf_name(cfg, comp, path, None, siglip_prefix=prefix), leaf)]
    except ValueError:  # a stacked parameter: one tensor per layer
        names = [
            (mapping.hf_name(cfg, comp, path, i, siglip_prefix=prefix), leaf[i])
            for i in range(shape[0])
        ]
    for name, value in names:
        if name not in dtypes:
            raise CheckpointError(f"{out}: parameter {brief(name)} is not in the recorded layout")
        target = mapping.resolve(cfg, comp, name)
        value = mapping.from_param(target.transform, value)
        writer.write(name, value.astype(dtypes[name], copy=False))


def _groups(tree: Mapping, group_bytes: int):
    """Leaves of ``tree`` in runs of about ``group_bytes`` (one Orbax load each)."""
    group, size = [], 0
    for path, spec in trees.leaves(tree):
        group.append((path, spec))
        size += int(np.prod(spec[0])) * spec[1].itemsize
        if size >= group_bytes:
            yield group
            group, size = [], 0
    if group:
        yield group


def check_layout(cfg: ModelConfig, comp: str, rec: Mapping, where: str) -> None:
    """The recorded tensor layout of ``comp`` against the model of ``cfg``: every parameter
    tensor is recorded once, with the shape the model implies and a floating dtype.

    Raises:
      CheckpointError: naming the tensor.
    """
    tensors = {n: (d, tuple(s)) for f in rec["plan"]["files"] for n, d, s in f["tensors"]}
    unused = set(rec["unused"])
    shapes = mapping.param_shapes(cfg, comp)
    for name, (dtype, shape) in tensors.items():
        if name in unused:
            continue
        target = mapping.resolve(cfg, comp, name)
        if not isinstance(target, mapping.Target):
            raise CheckpointError(
                f"{where}: tensor {brief(name)} is not a parameter of the model of model.yaml"
            )
        full = shapes[target.path]
        want = mapping.hf_shape(target.transform, full[1:] if target.layer is not None else full)
        if shape != want:
            raise CheckpointError(
                f"{where}: tensor {brief(name)} is recorded with shape {list(shape)}, "
                f"model.yaml implies {list(want)}"
            )
        if dtype not in FLOAT_CODES:
            raise CheckpointError(
                f"{where}: tensor {brief(name)} is recorded as {dtype}; parameters are "
                f"floating ({', '.join(FLOAT_CODES)})"
            )
    for name in mapping.expected_names(cfg, comp, siglip_prefix=rec["siglip_prefix"]):
        if name not in tensors or name in unused:
            raise CheckpointError(f"{where}: the recorded layout lacks tensor {brief(name)}")


def export_vila(ckpt: str | Path, out: str | Path, *, group_bytes: int = 16 << 20) -> None:
    """Writes the VILA layout of project checkpoint ``ckpt`` into the new directory ``out``.

    Parameters are restored in groups of about ``group_bytes`` (at least one leaf).
    The result loads with HF transformers (``AutoModelForCausalLM`` on ``llm/``,
    ``SiglipVisionModel`` on ``vision_tower/``) and with VILA's own loader.

    Raises:
      ConfigError: the config changed in a way the layout cannot express, or is invalid.
      CheckpointError: the checkpoint fails its integrity check, its provenance is invalid,
        or the stored params do not match the config or the recorded layout.
    """
    ckpt = Path(ckpt)
    verify_checkpoint(ckpt)
    cfg = read_model_config(ckpt)
    prov = read_provenance(ckpt)
    if "components" not in prov:
        raise CheckpointError(
            f"{ckpt}: no recorded VILA layout (source {brief(prov['source'])}); only checkpoints "
            "descending from an import can be exported"
        )
    tree = stored_tree(ckpt)
    check_stored_params(cfg, tree, ckpt)
    check_hf_files(ckpt, prov)
    for comp in COMPONENTS:
        check_layout(cfg, comp, prov["components"][comp], f"{ckpt}: provenance.components.{comp}")
    edits = config_edits(prov["source_model_config"], cfg)
    with atomic_dir(out) as tmp:
        if (ckpt / HF_DIR).is_dir():
            copy_tree(ckpt / HF_DIR, tmp, HF_DIR)
        names = [*_TOP_FILES, "llm/config.json", "vision_tower/config.json"]
        configs = {
            n: load_json(tmp / n, f"{HF_DIR}/{n}", CheckpointError)
            for n in names
            if (tmp / n).is_file()
        }
        for fname in apply_config_edits(configs, edits, cfg):
            (tmp / fname).write_text(json.dumps(configs[fname], indent=2, sort_keys=True) + "\n")
        for comp in COMPONENTS:
            rec = prov["components"][comp]
            _write_component(ckpt, tmp / comp, comp, cfg, rec, tree, group_bytes)
