"""The train state: a plain pytree of parameters (trainable / frozen), LoRA adapters, optimizer
state, counters and RNG, plus the bridge between flat parameter dicts and the NNX model.

Parameters are addressed by their '/'-joined path in ``nnx.to_pure_dict(nnx.state(model))``
(``llm/layers/self_attn/q_proj/kernel``; stacked layers are one leaf with a leading layer axis).
A stage's ``trainable`` regexes split the leaves in two; only the trainable part (and the LoRA
adapters) is handed to the optimizer, so frozen parameters carry no optimizer state at all.

Dtypes (``train.precision``): trainable parameters and LoRA adapters are the fp32 masters
(``precision.params``), frozen ones keep ``precision.frozen`` (default: the model's
``param_dtype``), whatever dtype the checkpoint stored them in.

State layout (nested dicts, so Orbax stores readable keys)::

    {"step": int32[],                    # completed steps (skipped ones included)
     "params": {"trainable": {...}, "frozen": {...}},   # "frozen" absent when empty
     "lora": {<path>: {"a": [..., in, r], "b": [..., r, out]}},  # absent without LoRA
     "opt": optax state of (trainable, lora),   # AdamW moments in the masters' dtype
     "counters": {"nonfinite": int32[], "consecutive_nonfinite": int32[], "empty": int32[],
                  "applied": int32[]},
     "rng": uint32[2]}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from longvila_jax.config.model import ModelConfig
from longvila_jax.core import trees
from longvila_jax.models.vlm import LongVILA
from longvila_jax.parallel.mesh import logical_to_spec
from longvila_jax.train.precision import cast_floating

Flat = dict[str, Any]


def abstract_model(cfg: ModelConfig):
    """The LongVILA model with ShapeDtypeStruct leaves (no allocation)."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: LongVILA(cfg, rngs=nnx.Rngs(0)))


def _key_name(entry: Any) -> str | None:
    if isinstance(entry, jax.tree_util.DictKey):
        return str(entry.key)
    if isinstance(entry, jax.tree_util.GetAttrKey) and entry.name == "value":
        return None  # the Variable's payload, not part of the parameter path
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return entry.name
    if isinstance(entry, jax.tree_util.SequenceKey):
        return str(entry.idx)
    return str(entry)


def _path_name(path: tuple) -> str:
    return "/".join(n for n in (_key_name(e) for e in path) if n is not None)


@dataclass
class ModelTemplate:
    """Static description of the model's parameters, and flat-dict <-> model conversion.

    Attributes:
      cfg: the model config.
      graphdef: NNX graph definition (static).
      names: parameter paths in pytree-leaf order.
      shapes: path -> ShapeDtypeStruct.
      logical_axes: path -> logical axis names (``core.axes``), or None.
    """

    cfg: ModelConfig
    graphdef: Any
    treedef: Any
    names: tuple[str, ...]
    shapes: dict[str, jax.ShapeDtypeStruct]
    logical_axes: dict[str, tuple[str | None, ...] | None]

    @classmethod
    def build(cls, cfg: ModelConfig) -> ModelTemplate:
        graphdef, state = nnx.split(abstract_model(cfg))
        leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
        names = tuple(_path_name(p) for p, _ in leaves)
        if len(set(names)) != len(names):
            raise ValueError("parameter paths are not unique")
        shapes = {
            n: jax.ShapeDtypeStruct(x.shape, x.dtype)
            for n, (_, x) in zip(names, leaves, strict=True)
        }
        axes: dict[str, Any] = {}
        for path, var in nnx.to_flat_state(state):
            meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
            axes["/".join(str(p) for p in path)] = meta.get("logical_axes")
        return cls(cfg, graphdef, jax.tree_util.tree_structure(state), names, shapes, axes)

    def merge(self, flat: Mapping[str, jax.Array]):
        """A LongVILA module whose parameters are ``flat`` (works under jit)."""
        missing = [n for n in self.names if n not in flat]
        if missing:
            raise KeyError(f"parameters missing: {missing[:3]}")
        state = jax.tree_util.tree_unflatten(self.treedef, [flat[n] for n in self.names])
        return nnx.merge(self.graphdef, state)

    def shardings(self, mesh: Mesh, rules: Mapping[str, tuple[str, ...]]) -> Flat:
        """path -> NamedSharding from the parameters' logical axes and a mesh rules table.

        A dimension whose size the mesh axes do not divide is replicated instead (GSPMD needs
        even shards for jit arguments).
        """
        out = {}
        for n in self.names:
            axes = self.logical_axes.get(n)
            shape = self.shapes[n].shape
            if axes is None or len(axes) != len(shape):
                out[n] = NamedSharding(mesh, P())
                continue
            spec = list(logical_to_spec(axes, rules))
            for i, part in enumerate(spec):
                parts = (part,) if isinstance(part, str) else tuple(part or ())
                size = int(np.prod([mesh.shape[a] for a in parts])) if parts else 1
                if shape[i] % size:
                    spec[i] = None
            out[n] = NamedSharding(mesh, P(*spec))
        return out


def abstract_param_paths(cfg: ModelConfig, *, with_shapes: bool = False):
    """Sorted parameter paths of the model (or path -> shape), from the abstract model."""
    graphdef, state = nnx.split(abstract_model(cfg))
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    if with_shapes:
        return {_path_name(p): tuple(x.shape) for p, x in leaves}
    return sorted(_path_name(p) for p, _ in leaves)


def flatten_model(model) -> Flat:
    """path -> array of a concrete model's parameters."""
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]
    return {_path_name(p): x for p, x in leaves}


def nest(flat: Mapping[str, Any]) -> dict:
    """{'a/b/c': x} -> {'a': {'b': {'c': x}}} (``core.trees.from_names``)."""
    return trees.from_names(flat)


def unnest(tree: Mapping) -> Flat:
    """Inverse of :func:`nest` (``core.trees.to_names``; a leaf is anything not a Mapping)."""
    return trees.to_names(tree)


def unnest_lora(tree: Mapping) -> dict[str, dict[str, Any]]:
    """Nested LoRA tree -> {kernel path: {"a": A, "b": B}}."""
    flat = unnest(tree)
    out: dict[str, dict[str, Any]] = {}
    for name, v in flat.items():
        base, _, ab = name.rpartition("/")
        out.setdefault(base, {})[ab] = v
    return out


def nest_lora(adapters: Mapping[str, Mapping[str, Any]]) -> dict:
    return nest({f"{k}/{ab}": v for k, d in adapters.items() for ab, v in d.items()})


def init_lora(shapes: Mapping[str, jax.ShapeDtypeStruct], paths, rank: int, key) -> dict:
    """LoRA adapters as PEFT initialises them, in fp32 (``create_state`` casts them to
    ``precision.params``).

    PEFT (the library upstream's ``llava/train/train_llm_to_long.py`` uses) draws lora_A with
    ``kaiming_uniform_(a=sqrt(5))`` over the torch weight [r, in]: uniform in
    [-1/sqrt(in), 1/sqrt(in)] (bound = sqrt(6 / ((1 + a^2) * fan_in)) with fan_in = in), and
    sets lora_B = 0, so the adapted model equals the base model at step 0. Our A is stored
    transposed, [..., in, r]; a stacked kernel [layers, in, out] gets one A per layer, each with
    fan_in = in. (Which other parameters train beside the adapters in stage 4, the RMSNorms and
    not the embeddings by PEFT's suffix rule for ``modules_to_save="embed,norm"``, is set by the
    stage YAMLs' ``trainable``.)

    Args:
      shapes: path -> ShapeDtypeStruct of the model's parameters.
      paths: the kernels to adapt ([..., in, out] each).
      rank: r.
      key: PRNG key (adapter i draws from ``fold_in(key, i)``, paths sorted).

    Returns:
      {path: {"a": [..., in, r], "b": [..., r, out]}} in fp32.
    """
    adapters = {}
    for i, name in enumerate(sorted(paths)):
        s = shapes[name].shape
        a_shape = (*s[:-1], rank)
        b_shape = (*s[:-2], rank, s[-1])
        bound = 1.0 / np.sqrt(s[-2])
        a = jax.random.uniform(
            jax.random.fold_in(key, i), a_shape, jnp.float32, minval=-bound, maxval=bound
        )
        adapters[name] = {"a": a, "b": jnp.zeros(b_shape, jnp.float32)}
    return adapters


def apply_lora(flat: Mapping[str, jax.Array], adapters: Mapping, scale: float) -> Flat:
    """Kernels with their LoRA deltas added: W + scale * A @ B (in W's dtype)."""
    out = dict(flat)
    for name, ab in adapters.items():
        w = flat[name]
        delta = jnp.einsum("...ir,...ro->...io", ab["a"], ab["b"]) * scale
        out[name] = (w.astype(jnp.float32) + delta).astype(w.dtype)
    return out


def split_params(flat: Mapping[str, Any], trainable: set[str] | tuple[str, ...]) -> dict:
    """{'trainable': nested, 'frozen': nested} ('frozen' omitted when empty)."""
    trainable = set(trainable)
    moving = {k: v for k, v in flat.items() if k in trainable}
    frozen = {k: v for k, v in flat.items() if k not in trainable}
    out = {"trainable": nest(moving)}
    if frozen:
        out["frozen"] = nest(frozen)
    return out


def model_params(state: Mapping, lora_scale: float | None = None) -> Flat:
    """All parameters of a train state as one flat dict, LoRA merged when present."""
    flat = unnest(state["params"]["trainable"])
    flat.update(unnest(state["params"].get("frozen", {})))
    if "lora" in state and lora_scale is not None:
        flat = apply_lora(flat, unnest_lora(state["lora"]), lora_scale)
    return flat


def diff_params(state: Mapping) -> dict:
    """The optimised part of the state: {'params': trainable, 'lora': adapters?}."""
    out = {"params": state["params"]["trainable"]}
    if "lora" in state:
        out["lora"] = state["lora"]
    return out


def init_counters() -> dict[str, jax.Array]:
    z = jnp.zeros((), jnp.int32)
    return {"nonfinite": z, "consecutive_nonfinite": z, "empty": z, "applied": z}


def create_state(
    flat_params: Flat, trainable, optimizer, *, lora=None, rng=None, policy=None
) -> dict:
    """A fresh train state (call under jit with the wanted shardings, or eagerly).

    Args:
      flat_params: path -> array (or ShapeDtypeStruct, under ``jax.eval_shape``).
      trainable: the paths the optimizer updates.
      optimizer: the optax transformation; its state is created over (trainable, LoRA).
      lora: ``init_lora``'s adapters, or None.
      rng: uint32[2], or None (zeros).
      policy: a ``train.precision.DtypePolicy``: trainable parameters and LoRA adapters are
        cast to ``policy.params`` (the masters; the AdamW moments are created in their dtype),
        frozen ones to ``policy.frozen``. None keeps the dtypes given.
    """
    params = split_params(flat_params, trainable)
    if policy is not None:
        params = {
            part: cast_floating(tree, policy.params if part == "trainable" else policy.frozen)
            for part, tree in params.items()
        }
    state: dict[str, Any] = {"step": jnp.zeros((), jnp.int32), "params": params}
    if lora:
        adapters = nest_lora(lora)
        state["lora"] = adapters if policy is None else cast_floating(adapters, policy.params)
    state["opt"] = optimizer.init(diff_params(state))
    state["counters"] = init_counters()
    state["rng"] = jnp.zeros((2,), jnp.uint32) if rng is None else rng
    return state


def state_shardings(abstract_state: Mapping, param_shardings: Flat, mesh: Mesh, optimizer) -> dict:
    """Shardings of a train state: parameters (and their Adam moments) follow the parameter
    shardings, LoRA adapters, counters and scalars are replicated."""
    replicated = NamedSharding(mesh, P())
    params = {
        part: nest({k: param_shardings[k] for k in unnest(tree)})
        for part, tree in abstract_state["params"].items()
    }
    out: dict[str, Any] = {"step": replicated, "params": params}
    if "lora" in abstract_state:
        out["lora"] = jax.tree.map(lambda _: replicated, abstract_state["lora"])
    diff_shardings = diff_params(out)
    out["opt"] = optax.tree_map_params(
        optimizer,
        lambda _, sh: sh,
        abstract_state["opt"],
        diff_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    out["counters"] = jax.tree.map(lambda _: replicated, abstract_state["counters"])
    out["rng"] = replicated
    return out


def all_finite(tree) -> jax.Array:
    """True when every floating leaf of ``tree`` is finite (one fused device reduction)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    if not leaves:
        return jnp.array(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


__all__ = [
    "ModelTemplate",
    "abstract_model",
    "abstract_param_paths",
    "all_finite",
    "apply_lora",
    "create_state",
    "diff_params",
    "flatten_model",
    "init_lora",
    "model_params",
    "nest",
    "split_params",
    "state_shardings",
    "unnest",
]
