"""Import VILA/LongVILA checkpoints as project checkpoints (plain HF parts: hf_parts_import).

Streaming: every tensor name is resolved and its header shape checked against the configured
model before anything is read (missing, unknown, duplicate and mis-shaped tensors fail early,
naming the tensor). Then parameters are built one leaf at a time (a stacked leaf reads its L
layer tensors one by one into one 64-byte aligned buffer, which ``jax.device_put`` aliases
instead of copying) and handed to Orbax partial saves in small groups, so peak memory is about
the largest stacked leaf plus Orbax's bounded cache, never the whole model (measured in
``tests/ckpt/test_convert_cli.py``). Everything that is not a weight (configs, tokenizer files)
is copied verbatim so that export can rebuild the identical VILA layout; pickle files are never
opened.

The source is hostile until checked: parameter tensors must have a floating dtype, every
tensor is checked for NaN/Inf as it is read (``allow_nonfinite`` accepts them with a warning),
and files are opened only as regular files inside the source folder (a FIFO is refused instead
of hanging the import; a symlink out of the folder, say to ``/etc/shadow``, is never read or
copied, except Hugging Face hub-cache links into the repository's ``blobs/``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from longvila_jax.ckpt import hf_config, mapping
from longvila_jax.ckpt.checks import FLOAT_CODES, check_finite
from longvila_jax.ckpt.orbax_io import (
    HF_DIR,
    UNUSED_DIR,
    ParamWriter,
    checkpoint_dir,
    write_metadata,
)
from longvila_jax.ckpt.safetensors_io import (
    PICKLE_SUFFIXES,
    CheckpointError,
    WeightSet,
    aligned_empty,
)
from longvila_jax.ckpt.safetensors_writer import PlanWriter, shard_plan
from longvila_jax.config.base import to_dict
from longvila_jax.config.model import ModelConfig
from longvila_jax.core.errors import brief
from longvila_jax.core.safe_paths import check_name, copy_file, is_regular

log = logging.getLogger(__name__)

COMPONENTS = hf_config.COMPONENTS
SIGLIP_PREFIX = "vision_model."
_NOT_AUX = (".safetensors", ".h5", ".msgpack", ".gguf", ".onnx", ".npz", ".npy", *PICKLE_SUFFIXES)
MAX_AUX_BYTES = 256 * 1024 * 1024
# Config fields that live in the HF/VILA JSON files and may change after import (see export).
EXPORTABLE = (
    ("llm", "rope_theta"),
    ("llm", "rope_scaling"),
    ("llm", "max_position_embeddings"),
    ("llm", "rms_norm_eps"),
    ("vision", "layer_norm_eps"),
    ("vision", "select_layer"),
)


def hf_shape(transform: str, shape: Sequence[int]) -> tuple[int, ...]:
    """Torch-layout shape of a parameter slice of ``shape`` (no array of that size is built)."""
    probe = [2, 3, 5, 7, 11, 13, 17, 19][: len(shape)]
    out = mapping.from_param(transform, np.empty(probe, np.uint8)).shape
    return tuple(shape[probe.index(d)] for d in out)


@dataclass
class ComponentPlan:
    """Which stored tensor fills which parameter slice, for one VILA sub-folder."""

    component: str
    weights: WeightSet
    sources: dict[tuple[str, ...], dict[int | None, str]] = field(default_factory=dict)
    transforms: dict[tuple[str, ...], str] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)
    siglip_prefix: bool = False


def plan_component(cfg: ModelConfig, component: str, weights: WeightSet) -> ComponentPlan:
    """Resolves every tensor of ``weights`` and checks names and shapes (headers only).

    Raises:
      CheckpointError: an unknown, duplicate, missing or mis-shaped tensor (named).
    """
    where = f"{weights.directory}"
    plan = ComponentPlan(component, weights)
    if component == "vision_tower":
        prefixed = {n.startswith(SIGLIP_PREFIX) for n in weights.names}
        if len(prefixed) > 1:
            raise CheckpointError(f"{where}: mixes prefixed and unprefixed SigLIP tensor names")
        plan.siglip_prefix = prefixed == {True}
    shapes = mapping.param_shapes(cfg, component)
    for name in weights.names:
        target = mapping.resolve(cfg, component, name)
        if target is None:
            raise CheckpointError(
                f"{where}: unexpected tensor {brief(name)} (no parameter maps to it)"
            )
        if target == "unused":
            plan.unused.append(name)
            continue
        slots = plan.sources.setdefault(target.path, {})
        if target.layer in slots:
            raise CheckpointError(
                f"{where}: tensor {brief(name)} duplicates {brief(slots[target.layer])}"
            )
        full = shapes[target.path]
        want = hf_shape(target.transform, full[1:] if target.layer is not None else full)
        info = weights.info(name)
        if info.shape != want:
            raise CheckpointError(
                f"{where}: tensor {name!r} has shape {list(info.shape)}, the configured model "
                f"needs {list(want)}"
            )
        if info.dtype not in FLOAT_CODES:  # e.g. F32 data whose header says I32
            raise CheckpointError(
                f"{where}: tensor {name!r} ({weights.where[name]}) has dtype {info.dtype}; "
                f"parameters must be floating ({', '.join(FLOAT_CODES)})"
            )
        slots[target.layer] = name
        plan.transforms[target.path] = target.transform
    have = {n for s in plan.sources.values() for n in s.values()}
    for name in mapping.expected_names(cfg, component, siglip_prefix=plan.siglip_prefix):
        if name not in have:
            raise CheckpointError(f"{where}: missing tensor {name!r}")
    for path, slots in plan.sources.items():
        dtypes = {weights.info(n).dtype for n in slots.values()}
        if len(dtypes) > 1:
            raise CheckpointError(f"{where}: layers of {'/'.join(path)} mix dtypes {dtypes}")
    return plan


def iter_leaves(
    cfg: ModelConfig,
    plan: ComponentPlan,
    *,
    dtype: np.dtype | None = None,
    on_tensor: Callable[[str], None] | None = None,
    allow_nonfinite: bool = False,
) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """Yields (param path, array) one leaf at a time, in the configured model's layout.

    Args:
      cfg: model config.
      plan: from ``plan_component``.
      dtype: cast to this dtype (None keeps the stored dtype, for bitwise round trips).
      on_tensor: called with each tensor name after it was read (progress bars).
      allow_nonfinite: accept NaN/Inf values with a logged warning instead of refusing them.

    Raises:
      CheckpointError: a tensor holds NaN or Inf (named) and ``allow_nonfinite`` is false.
    """
    shapes = mapping.param_shapes(cfg, plan.component)
    ws = plan.weights

    def read(name: str) -> np.ndarray:
        array = ws.read(name)
        check_finite(
            array, f"{ws.directory / ws.where[name]}: tensor {name!r}", allow=allow_nonfinite
        )
        return array

    for path, shape in shapes.items():
        slots, tr = plan.sources[path], plan.transforms[path]
        stored = ws.info(slots[next(iter(slots))]).np_dtype
        out = aligned_empty(shape, dtype or stored)
        if None in slots:
            out[...] = mapping.to_param(tr, read(slots[None]))
            if on_tensor:
                on_tensor(slots[None])
            yield path, out
            continue
        for layer in range(shape[0]):
            out[layer] = mapping.to_param(tr, read(slots[layer]))
            if on_tensor:
                on_tensor(slots[layer])
        yield path, out


def copy_aux_files(src: Path, dst: Path, root: Path | None = None) -> list[str]:
    """Copies the non-weight regular files of ``src`` (configs, tokenizer) verbatim.

    Args:
      src: a source folder.
      dst: the folder to copy into (created).
      root: the source tree ``src`` belongs to (default ``src``): a symlink is followed only
        if it stays inside (hub-cache links into ``blobs/`` excepted).

    Returns:
      The copied file names. Links out of ``root``, FIFOs and other special files, and names
      that are not plain file names are skipped with a logged warning naming them.
    """
    root = Path(root) if root is not None else src
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for p in sorted(src.iterdir()):
        if (
            p.name.startswith(".")
            or p.name.endswith(_NOT_AUX)
            or p.name.endswith(".safetensors.index.json")
            or (p.is_dir() and not p.is_symlink())
        ):
            continue
        if not is_regular(p, root):
            log.warning("skipping %s: a link out of %s or not a regular file", p, root)
            continue
        try:
            check_name(p.name, "file name")
        except CheckpointError:
            log.warning("skipping %s: not a plain file name", brief(str(p)))
            continue
        if os.stat(p).st_size > MAX_AUX_BYTES:
            continue
        copy_file(p, dst / p.name, f"{p}", root=root)
        copied.append(p.name)
    return copied


def _write_unused(plan: ComponentPlan, directory: Path, on_tensor) -> None:
    if not plan.unused:
        return
    directory.mkdir(exist_ok=True)
    specs = [[n, plan.weights.info(n).dtype, list(plan.weights.info(n).shape)] for n in plan.unused]
    file = {"name": f"{plan.component}.safetensors", "metadata": {}, "tensors": specs}
    writer = PlanWriter(directory, {"index": None, "files": [file]})
    try:
        for n in plan.unused:
            writer.write(n, plan.weights.read(n))
            on_tensor(n)
        writer.close()
    except BaseException:
        writer.abort()
        raise


def component_record(plan: ComponentPlan) -> dict:
    """Provenance of one component: file plan, verbatim index text, SigLIP spelling, unused."""
    if plan.weights.is_subset:  # e.g. the vision half of a full SiglipModel: one new file
        ws = plan.weights
        specs = [(n, ws.info(n).dtype, ws.info(n).shape) for n in ws.names]
        return {
            "siglip_prefix": plan.siglip_prefix,
            "plan": shard_plan(specs, None),
            "index_text": None,
            "unused": plan.unused,
        }
    return {
        "siglip_prefix": plan.siglip_prefix,
        "plan": plan.weights.plan(),
        "index_text": plan.weights.index_text,  # verbatim, as read and checked
        "unused": plan.unused,
    }


def source_config(cfg: ModelConfig, data: dict) -> dict:
    """``cfg`` with the JSON-backed fields as the files had them (``--set`` ones count as edits)."""
    src = to_dict(cfg)
    for section, key in EXPORTABLE:
        if key in data[section]:
            src[section][key] = data[section][key]
    return src


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="tensor", disable=not enabled, desc="converting")


def write_params(
    cfg: ModelConfig,
    plans: dict[str, ComponentPlan],
    tmp: Path,
    progress: bool,
    extra=(),
    *,
    allow_nonfinite: bool = False,
) -> None:
    """Streams every component's params (and unused tensors) into checkpoint dir ``tmp``.

    ``extra`` holds further (component, path, array) leaves, e.g. a new projector;
    ``allow_nonfinite`` accepts NaN/Inf weights with a warning (see ``iter_leaves``).
    """
    total = sum(len(p.weights.names) for p in plans.values())
    writer = ParamWriter(tmp)
    with _progress(total, progress) as bar:

        def tick(_name: str) -> None:
            bar.update(1)

        for comp, plan in plans.items():
            _write_unused(plan, tmp / UNUSED_DIR, tick)
            leaves = iter_leaves(cfg, plan, on_tensor=tick, allow_nonfinite=allow_nonfinite)
            for path, value in leaves:
                writer.save(comp, path, value)
                del value
        for comp, path, value in extra:
            writer.save(comp, path, value)
    writer.finalize()


def import_vila(
    src: str | Path,
    out: str | Path,
    *,
    overrides: Sequence[str] = (),
    progress: bool = False,
    allow_nonfinite: bool = False,
) -> ModelConfig:
    """Converts a VILA/LongVILA-layout directory into a project checkpoint at ``out``.

    Args:
      src: directory with ``config.json`` and ``llm/``, ``vision_tower/``, ``mm_projector/``.
      out: new checkpoint directory (must not exist; nothing is left there on error).
      overrides: dotted ``ModelConfig`` overrides, e.g. ``projector.token_order=row_major``.
      progress: show a tqdm bar.
      allow_nonfinite: accept NaN/Inf weights with a logged warning instead of refusing them.

    Returns:
      The ModelConfig written to ``out/model.yaml``.

    Raises:
      ConfigError, CheckpointError: a malformed, inconsistent or unsafe source (named).
      FileExistsError: ``out`` exists.
    """
    src = Path(src)
    data, source = hf_config.read_vila(src)
    weights = {c: WeightSet(source.dirs[c], src) for c in COMPONENTS}
    tokenizer = hf_config.load_tokenizer_dir(source.dirs["llm"], root=src)
    cfg = hf_config.build_config(data, tokenizer, weights, overrides)
    plans = {c: plan_component(cfg, c, weights[c]) for c in COMPONENTS}
    with checkpoint_dir(out) as tmp:
        files = copy_aux_files(src, tmp / HF_DIR, src)
        for c in COMPONENTS:
            copied = copy_aux_files(source.dirs[c], tmp / HF_DIR / c, src)
            files += [f"{c}/{f}" for f in copied]
        write_params(cfg, plans, tmp, progress, allow_nonfinite=allow_nonfinite)
        write_metadata(
            tmp,
            cfg,
            {
                "source": {
                    "layout": "vila",
                    "path": str(src),
                    "top_file": source.top_file,
                    "notes": source.notes,
                },
                "source_model_config": source_config(cfg, data),
                "hf_files": files,
                "components": {c: component_record(p) for c, p in plans.items()},
            },
        )
    return cfg


def dump_json(path: Path, data: dict) -> None:
    """Writes JSON the way HF ``save_pretrained`` does (indent 2, sorted keys, newline)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
