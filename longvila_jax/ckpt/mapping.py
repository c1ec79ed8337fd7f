"""HF tensor names <-> NNX parameter paths, layout transforms, and in-memory import/export.

The rules are data (``longvila_jax/ckpt/mappings/{llm,siglip,projector}.py``); this module
compiles their templates to regexes and answers three questions for the file converters and
for tests: which parameter does an HF tensor fill (:func:`resolve`), which HF tensors must a
checkpoint hold (:func:`expected_names`), and what is a parameter's HF name (:func:`hf_name`).
Whether a configured model *has* a parameter (a bias, an untied head) is read from the model
itself (``nnx.eval_shape``), so the tables never duplicate config logic.

Components are VILA's sub-folders: ``llm``, ``vision_tower``, ``mm_projector``.
"""

from __future__ import annotations

import functools
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import jax.numpy as jnp
import numpy as np
from flax import nnx

from longvila_jax.ckpt.mappings import Rule
from longvila_jax.ckpt.mappings import llm as llm_map
from longvila_jax.ckpt.mappings import projector as proj_map
from longvila_jax.ckpt.mappings import siglip as siglip_map
from longvila_jax.config.model import ModelConfig
from longvila_jax.core import trees
from longvila_jax.models.llm import LLM
from longvila_jax.models.projector import Projector
from longvila_jax.models.vision import VisionTower

Component = Literal["llm", "vision_tower", "mm_projector"]
COMPONENTS: tuple[str, ...] = ("llm", "vision_tower", "mm_projector")
_ATTR = {"llm": "llm", "vision_tower": "vision", "mm_projector": "projector"}
Path = tuple[str, ...]


@dataclass(frozen=True)
class Target:
    """Where one HF tensor goes.

    Attributes:
      path: path in ``nnx.to_pure_dict(nnx.state(model.<llm|vision|projector>))``.
      layer: index along the leading stacked-layer axis, None if the parameter is not stacked.
      transform: name of the bitwise-invertible layout transform (see ``TRANSFORMS``).
    """

    path: Path
    layer: int | None
    transform: str


# name -> (HF -> param, param -> HF). Each pair only permutes axes, so it is exactly invertible.
TRANSFORMS = {
    "identity": (lambda a: a, lambda a: a),
    "transpose": (lambda a: np.swapaxes(a, 0, 1), lambda a: np.swapaxes(a, 0, 1)),
    # torch Conv2d weight [O, I, kh, kw] <-> HWIO [kh, kw, I, O]
    "conv_oihw_to_hwio": (
        lambda a: np.transpose(a, (2, 3, 1, 0)),
        lambda a: np.transpose(a, (3, 2, 0, 1)),
    ),
}


def _transform(name: str, array: np.ndarray, direction: int) -> np.ndarray:
    if name not in TRANSFORMS:
        raise KeyError(f"unknown transform {name!r}; known: {sorted(TRANSFORMS)}")
    out = TRANSFORMS[name][direction](np.asarray(array))
    # Materialise the permutation so the result owns a C-contiguous buffer (safetensors wants it).
    return np.ascontiguousarray(out)


def to_param(transform: str, array: np.ndarray) -> np.ndarray:
    """HF (torch) layout -> parameter layout."""
    return _transform(transform, array, 0)


def from_param(transform: str, array: np.ndarray) -> np.ndarray:
    """Parameter layout -> HF (torch) layout; the exact inverse of :func:`to_param`."""
    return _transform(transform, array, 1)


def _check_component(component: str) -> None:
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")


def _rules(cfg: ModelConfig, component: str) -> tuple[tuple[Rule, ...], tuple[str, ...]]:
    _check_component(component)
    if component == "llm":
        return llm_map.RULES, llm_map.UNUSED
    if component == "vision_tower":
        return siglip_map.RULES, siglip_map.UNUSED
    return proj_map.RULES[cfg.projector.type], proj_map.UNUSED


@functools.lru_cache(maxsize=256)
def _regex(template: str) -> re.Pattern:
    return re.compile(r"(\d+)".join(re.escape(part) for part in template.split("{layer}")))


def _build(cfg: ModelConfig, component: str) -> nnx.Module:
    cls = {"llm": LLM, "vision_tower": VisionTower, "mm_projector": Projector}[component]
    return cls(cfg, rngs=nnx.Rngs(0))


@functools.lru_cache(maxsize=32)
def param_shapes(cfg: ModelConfig, component: str) -> Mapping[Path, tuple[int, ...]]:
    """Parameter path -> shape of the configured component, from an abstract model (no memory).

    The result is cached per (cfg, component) and read-only.
    """
    _check_component(component)
    abstract = nnx.eval_shape(lambda: _build(cfg, component))
    flat = trees.flatten(nnx.to_pure_dict(nnx.state(abstract)))
    return types.MappingProxyType({p: tuple(v.shape) for p, v in flat.items()})


def num_stacked(cfg: ModelConfig, component: str) -> int:
    """Length of the stacked-layer axis of ``component`` (0 if it has none)."""
    if component == "llm":
        return cfg.llm.num_hidden_layers
    if component == "vision_tower":
        return cfg.vision.layers_used
    return 0


def resolve(cfg: ModelConfig, component: Component, name: str) -> Target | Literal["unused"] | None:
    """Maps an HF tensor name of a VILA sub-folder to its parameter.

    Args:
      cfg: model config (decides which parameters exist).
      component: "llm", "vision_tower" or "mm_projector".
      name: tensor name as stored in that sub-folder's safetensors; SigLIP names may carry the
        legacy ``vision_model.`` prefix.

    Returns:
      A :class:`Target`; ``"unused"`` for a tensor real checkpoints hold but the model does not
      read (the converter keeps it verbatim); None for an unknown tensor.
    """
    rules, unused = _rules(cfg, component)
    if component == "vision_tower" and name.startswith(siglip_map.PREFIX):
        name = name[len(siglip_map.PREFIX) :]
    if any(re.fullmatch(p, name) for p in unused):
        return "unused"
    shapes = param_shapes(cfg, component)
    for rule in rules:
        m = _regex(rule.template).fullmatch(name)
        if m is None:
            continue
        if rule.path not in shapes:
            return "unused" if rule.if_absent == "unused" else None
        if not rule.stacked:
            return Target(rule.path, None, rule.transform)
        layer = int(m.group(1))
        if layer < num_stacked(cfg, component):
            return Target(rule.path, layer, rule.transform)
        # SigLIP layers after the selected one exist in the checkpoint but never run.
        if component == "vision_tower" and layer < cfg.vision.num_hidden_layers:
            return "unused"
        return None
    return None


def _rule_for(cfg: ModelConfig, component: str, path: Path) -> Rule:
    for rule in _rules(cfg, component)[0]:
        if rule.path == tuple(path):
            return rule
    raise KeyError(f"{component}: no mapping rule for parameter {'/'.join(path)}")


def hf_name(
    cfg: ModelConfig,
    component: Component,
    target_path: Path,
    layer: int | None,
    *,
    siglip_prefix: bool = False,
) -> str:
    """HF tensor name of parameter ``target_path`` (``layer`` if stacked); inverts resolve."""
    rule = _rule_for(cfg, component, target_path)
    if rule.stacked != (layer is not None):
        raise ValueError(
            f"{component}: parameter {'/'.join(target_path)} "
            f"{'is' if rule.stacked else 'is not'} stacked; got layer={layer}"
        )
    name = rule.template.format(layer=layer) if rule.stacked else rule.template
    if component == "vision_tower" and siglip_prefix:
        name = siglip_map.PREFIX + name
    return name


def _param_names(cfg: ModelConfig, component: str, siglip_prefix: bool):
    """Yields (hf_name, path, layer, rule) for every parameter slice of the configured model."""
    for path in param_shapes(cfg, component):
        rule = _rule_for(cfg, component, path)
        layers = range(num_stacked(cfg, component)) if rule.stacked else [None]
        for layer in layers:
            yield (
                hf_name(cfg, component, path, layer, siglip_prefix=siglip_prefix),
                path,
                layer,
                rule,
            )


def expected_names(
    cfg: ModelConfig, component: Component, *, siglip_prefix: bool = False
) -> list[str]:
    """Every HF tensor name the configured component's parameters are read from."""
    return [n for n, *_ in _param_names(cfg, component, siglip_prefix)]


def hf_shape(transform: str, param_shape: tuple[int, ...]) -> tuple[int, ...]:
    """HF (torch) shape of a tensor whose parameter-layout shape is ``param_shape``."""
    if transform not in TRANSFORMS:
        raise KeyError(f"unknown transform {transform!r}; known: {sorted(TRANSFORMS)}")
    # A zero-stride view: the transform only permutes axes, so no memory is touched.
    return tuple(TRANSFORMS[transform][1](np.broadcast_to(np.uint8(0), param_shape)).shape)


def _component_module(model: nnx.Module, component: str) -> nnx.Module:
    _check_component(component)
    return getattr(model, _ATTR[component]) if hasattr(model, _ATTR[component]) else model


def load_state_dict(
    model: nnx.Module, component: Component, state: Mapping[str, np.ndarray]
) -> None:
    """Imports HF-named tensors into a component, in memory, casting to ``cfg.param_dtype``.

    Args:
      model: a ``LongVILA`` model or the component module itself (may be abstract, from
        ``nnx.eval_shape``); updated in place.
      component: "llm", "vision_tower" or "mm_projector".
      state: HF tensor name -> array in torch layout.

    Raises:
      KeyError: an unknown tensor, a tensor given twice, or missing tensors (all named).
      ValueError: a tensor whose shape does not match the configured model.
    """
    module = _component_module(model, component)
    cfg: ModelConfig = module.cfg
    dtype = jnp.dtype(cfg.param_dtype)
    shapes = param_shapes(cfg, component)
    n_layers = num_stacked(cfg, component)
    buffers: dict[Path, np.ndarray] = {}
    seen: dict[tuple[Path, int | None], str] = {}
    for name, array in state.items():
        target = resolve(cfg, component, name)
        if target is None:
            raise KeyError(f"{component}: unknown tensor {name!r}")
        if target == "unused":
            continue
        key = (target.path, target.layer)
        if key in seen:
            raise KeyError(f"{component}: tensor {name!r} duplicates {seen[key]!r}")
        seen[key] = name
        full = shapes[target.path]
        want = full[1:] if target.layer is not None else full
        array = np.asarray(array)
        if tuple(array.shape) != hf_shape(target.transform, want):
            raise ValueError(
                f"{component}: tensor {name!r} has shape {tuple(array.shape)}, expected "
                f"{hf_shape(target.transform, want)} for the configured model"
            )
        value = to_param(target.transform, array).astype(dtype, copy=False)
        if target.layer is None:
            buffers[target.path] = value
        else:
            buf = buffers.setdefault(target.path, np.empty((n_layers, *want), dtype))
            buf[target.layer] = value
    missing = [
        n for n, path, layer, _ in _param_names(cfg, component, False) if (path, layer) not in seen
    ]
    if missing:
        shown = ", ".join(missing[:10]) + (
            f" ... ({len(missing)} in all)" if len(missing) > 10 else ""
        )
        raise KeyError(f"{component}: missing tensors: {shown}")
    graph_state = nnx.state(module)
    pure = nnx.to_pure_dict(graph_state)
    for path, value in buffers.items():
        node = pure
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = jnp.asarray(value)
    nnx.replace_by_pure_dict(graph_state, pure)
    nnx.update(module, graph_state)


def export_state_dict(
    model: nnx.Module, component: Component, *, siglip_prefix: bool = False
) -> dict[str, np.ndarray]:
    """HF-named tensors (torch layout, parameter dtype) of a component's parameters.

    Args:
      model: a ``LongVILA`` model or the component module itself.
      component: "llm", "vision_tower" or "mm_projector".
      siglip_prefix: write SigLIP names with the legacy ``vision_model.`` prefix.

    Returns:
      HF tensor name -> numpy array, exactly :func:`expected_names`.
    """
    module = _component_module(model, component)
    cfg: ModelConfig = module.cfg
    flat = trees.flatten(nnx.to_pure_dict(nnx.state(module)))
    out: dict[str, np.ndarray] = {}
    for name, path, layer, rule in _param_names(cfg, component, siglip_prefix):
        value = np.asarray(flat[path])
        if layer is not None:
            value = value[layer]
        out[name] = from_param(rule.transform, value)
    return out
