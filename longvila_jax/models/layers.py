"""Hand-written NNX building blocks shared by the vision tower, projector and LLM.

Every parameter is an ``nnx.Param`` carrying ``logical_axes`` metadata (names from
``longvila_jax.core.axes``) so the sharding code can place it without knowing the model. The
dtype policy is uniform: parameters are stored in ``param_dtype``, matmuls run in
``compute_dtype``, and normalisation statistics are computed in fp32 (HF does the same).

Stacked layers are built with ``nnx.vmap`` (one leading ``LAYERS`` axis) and run with
``nnx.scan`` under an optional ``nnx.remat``; see :func:`stack_layers` and :func:`scan_layers`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from longvila_jax.core.attention import ATTENTION_OUT
from longvila_jax.core.axes import LAYERS, NORM

Axes = tuple[str | None, ...]

# cfg.remat -> jax.checkpoint policy of the scanned layer body; "none" disables rematerialisation.
# From least to most memory (docs/architecture.md, "Fast training step"):
#   nothing_saveable: keep only each layer's input carry, recompute the whole layer in the
#     backward (full remat: the long-context default, one extra forward);
#   save_attention: also keep the tagged attention output (``core.attention.ATTENTION_OUT``):
#     the dense reference then skips its P @ V matmul in the recomputation, but a custom_vjp
#     kernel (the ring) reruns its forward for its residuals unless it names o and LSE so too;
#   dots_with_no_batch_dims_saveable: keep every projection/MLP matmul output (weights-only
#     dots), recompute the attention and elementwise ops;
#   dots_saveable: keep every matmul output, the attention's score dots included;
#   everything / none: keep all residuals (short sequences only).
REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
    "none": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "save_attention": jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT),
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "everything": jax.checkpoint_policies.everything_saveable,
}


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: jnp.dtype, std: float) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Dense(nnx.Module):
    """``y = x @ kernel + bias`` with kernel [in, out] (the transpose of a torch Linear weight)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str | None, str | None],
        use_bias: bool = True,
        param_dtype: jnp.dtype = jnp.float32,
        compute_dtype: jnp.dtype = jnp.float32,
        init_std: float = 0.02,
        rngs: nnx.Rngs,
    ):
        self.compute_dtype = compute_dtype
        self.kernel = nnx.Param(
            _normal(rngs, (in_features, out_features), param_dtype, init_std), logical_axes=axes
        )
        self.bias = (
            nnx.Param(jnp.zeros((out_features,), param_dtype), logical_axes=(axes[1],))
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., in] -> [..., out] in compute dtype."""
        dtype = self.compute_dtype
        y = jnp.einsum("...i,io->...o", x.astype(dtype), self.kernel[...].astype(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class LayerNorm(nnx.Module):
    """torch ``nn.LayerNorm`` (biased variance, affine); statistics in fp32."""

    def __init__(
        self,
        dim: int,
        *,
        eps: float,
        axes: Axes = (NORM,),
        param_dtype: jnp.dtype = jnp.float32,
        compute_dtype: jnp.dtype = jnp.float32,
    ):
        self.eps = eps
        self.compute_dtype = compute_dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=axes)
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., dim] -> [..., dim] in compute dtype."""
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.compute_dtype)


class RMSNorm(nnx.Module):
    """HF ``LlamaRMSNorm``: normalise in fp32, cast back, then multiply by the weight."""

    def __init__(
        self,
        dim: int,
        *,
        eps: float,
        axes: Axes = (NORM,),
        param_dtype: jnp.dtype = jnp.float32,
        compute_dtype: jnp.dtype = jnp.float32,
    ):
        self.eps = eps
        self.compute_dtype = compute_dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., dim] -> [..., dim] in compute dtype."""
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(self.compute_dtype)
        return self.scale[...].astype(self.compute_dtype) * y


class Embed(nnx.Module):
    """Lookup table [num_embeddings, dim]; ``attend`` gives tied-output logits."""

    def __init__(
        self,
        num_embeddings: int,
        dim: int,
        *,
        axes: tuple[str | None, str | None],
        param_dtype: jnp.dtype = jnp.float32,
        compute_dtype: jnp.dtype = jnp.float32,
        init_std: float = 0.02,
        rngs: nnx.Rngs,
    ):
        self.compute_dtype = compute_dtype
        self.embedding = nnx.Param(
            _normal(rngs, (num_embeddings, dim), param_dtype, init_std), logical_axes=axes
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids [...] int (must be in range; callers mask media ids) -> [..., dim]."""
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.compute_dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """[..., dim] -> [..., num_embeddings]: x @ embedding.T."""
        dtype = self.compute_dtype
        return jnp.einsum("...d,vd->...v", x.astype(dtype), self.embedding[...].astype(dtype))


def gelu(x: jax.Array, act: str) -> jax.Array:
    """HF activation by name: ``gelu_pytorch_tanh`` = tanh approximation, ``gelu`` = exact erf."""
    if act == "gelu_pytorch_tanh":
        return jax.nn.gelu(x, approximate=True)
    if act == "gelu":
        return jax.nn.gelu(x, approximate=False)
    raise ValueError(f"unsupported activation {act!r}")


def add_layer_axis(module: nnx.Module) -> None:
    """Prepends ``LAYERS`` to the ``logical_axes`` of every Param of a vmapped (stacked) module.

    ``nnx.vmap`` adds the leading axis to the arrays but leaves custom metadata untouched.
    """
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Param):
            axes = var.get_metadata().get("logical_axes")
            if axes is None:
                raise ValueError(f"Param of shape {var[...].shape} has no logical_axes metadata")
            var.set_metadata("logical_axes", (LAYERS, *axes))


def stack_layers(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
    """Builds ``n`` independently initialised copies of ``make(rngs)`` stacked on a leading axis."""
    if n < 1:
        raise ValueError(f"need at least one layer to stack, got {n}")

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def _make(r: nnx.Rngs) -> nnx.Module:
        return make(r)

    stacked = _make(rngs)
    add_layer_axis(stacked)
    return stacked


def scan_layers(
    layers: nnx.Module,
    x: jax.Array,
    *broadcast: Any,
    remat: str = "none",
    call: Callable[..., jax.Array] | None = None,
) -> jax.Array:
    """Runs stacked ``layers`` over carry ``x``: ``x = layer_i(x, *broadcast)`` for each i.

    Args:
      layers: module built by :func:`stack_layers`; called as ``layer(x, *broadcast) -> x``.
      x: the carried activation.
      *broadcast: arrays passed unchanged to every layer (positions, segment ids, RoPE tables).
      remat: a key of ``REMAT_POLICIES``; "none" keeps every activation.
      call: ``call(layer, x, *broadcast) -> x``; lets callers close over non-array arguments
        (an attention function). Defaults to ``layer(x, *broadcast)``.

    Returns:
      The carry after the last layer.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat policy must be one of {list(REMAT_POLICIES)}, got {remat!r}")
    policy = REMAT_POLICIES[remat]

    def body(carry: jax.Array, layer: nnx.Module, *args: Any) -> jax.Array:
        return call(layer, carry, *args) if call is not None else layer(carry, *args)

    if remat != "none":
        body = nnx.remat(body, policy=policy)
    in_axes = (nnx.Carry, 0) + (None,) * len(broadcast)
    return nnx.scan(body, in_axes=in_axes, out_axes=nnx.Carry)(x, layers, *broadcast)
