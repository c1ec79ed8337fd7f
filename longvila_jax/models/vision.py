"""SigLIP vision tower (HF ``SiglipVisionModel`` maths) truncated at VILA's feature layer.

Port of ``transformers/models/siglip/modeling_siglip.py`` (transformers 5.24.0): a strided-conv
patch embedding plus learned position embeddings, then pre-LN encoder layers
(``x += attn(LN1(x)); x += MLP(LN2(x))``). VILA reads ``hidden_states[select_layer]`` (-2 for
every LongVILA release), so only the first ``cfg.vision.layers_used`` encoder layers are built;
the last layer, ``post_layernorm`` and the attention-pool head never influence the output and
are left out of the model (the checkpoint converter keeps them verbatim).

Parameter paths (``nnx.to_pure_dict``) follow the HF module names, which keeps the mapping table
in ``longvila_jax/ckpt/mappings/siglip.py`` short.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from longvila_jax.config.base import ConfigError
from longvila_jax.config.model import ModelConfig, VisionConfig
from longvila_jax.core.attention import ATTENTION_OUT, AttentionFn, dense_attention
from longvila_jax.core.axes import (
    CONV,
    PATCHES,
    VISION_EMBED,
    VISION_HEADS,
    VISION_MLP,
)
from longvila_jax.models.layers import (
    Dense,
    Embed,
    LayerNorm,
    gelu,
    scan_layers,
    stack_layers,
)


class PatchEmbedding(nnx.Module):
    """Conv2d(C -> D, kernel = stride = patch, "valid") with an HWIO kernel [p, p, C, D]."""

    def __init__(self, vision_cfg: VisionConfig, *, param_dtype, compute_dtype, rngs: nnx.Rngs):
        p, c, d = vision_cfg.patch_size, vision_cfg.num_channels, vision_cfg.hidden_size
        self.patch = p
        self.compute_dtype = compute_dtype
        std = (p * p * c) ** -0.5
        kernel = std * jax.random.normal(rngs.params(), (p, p, c, d), jnp.float32)
        self.kernel = nnx.Param(
            kernel.astype(param_dtype), logical_axes=(CONV, CONV, CONV, VISION_EMBED)
        )
        self.bias = nnx.Param(jnp.zeros((d,), param_dtype), logical_axes=(VISION_EMBED,))

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """[N, H, W, C] -> [N, H/p * W/p, D], patches in row-major order."""
        dtype = self.compute_dtype
        y = jax.lax.conv_general_dilated(
            pixels.astype(dtype),
            self.kernel[...].astype(dtype),
            window_strides=(self.patch, self.patch),
            padding="VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        y = y + self.bias[...].astype(dtype)
        n, h, w, d = y.shape
        return y.reshape(n, h * w, d)


class Embeddings(nnx.Module):
    """Patch embedding plus one learned position embedding per patch (no interpolation)."""

    def __init__(self, vision_cfg: VisionConfig, *, param_dtype, compute_dtype, rngs: nnx.Rngs):
        kwargs = dict(param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)
        self.patch_embedding = PatchEmbedding(vision_cfg, **kwargs)
        self.position_embedding = Embed(
            vision_cfg.num_patches, vision_cfg.hidden_size, axes=(PATCHES, VISION_EMBED), **kwargs
        )

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """[N, H, W, C] -> [N, P, D]."""
        x = self.patch_embedding(pixels)
        return x + self.position_embedding.embedding[...].astype(x.dtype)[None]


class SelfAttention(nnx.Module):
    """Bidirectional multi-head attention with biased q/k/v/out projections."""

    def __init__(self, vision_cfg: VisionConfig, *, param_dtype, compute_dtype, rngs: nnx.Rngs):
        d = vision_cfg.hidden_size
        kwargs = dict(param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)
        self.num_heads = vision_cfg.num_attention_heads
        self.head_dim = vision_cfg.head_dim
        self.q_proj = Dense(d, d, axes=(VISION_EMBED, VISION_HEADS), **kwargs)
        self.k_proj = Dense(d, d, axes=(VISION_EMBED, VISION_HEADS), **kwargs)
        self.v_proj = Dense(d, d, axes=(VISION_EMBED, VISION_HEADS), **kwargs)
        self.out_proj = Dense(d, d, axes=(VISION_HEADS, VISION_EMBED), **kwargs)

    def __call__(self, x: jax.Array, attn_fn: AttentionFn) -> jax.Array:
        """[N, P, D] -> [N, P, D]."""
        n, p, _ = x.shape
        shape = (n, p, self.num_heads, self.head_dim)
        q = self.q_proj(x).reshape(shape)
        k = self.k_proj(x).reshape(shape)
        v = self.v_proj(x).reshape(shape)
        segment_ids = jnp.ones((n, p), jnp.int32)  # one frame, every patch sees every patch
        positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (n, p))
        o = attn_fn(
            q,
            k,
            v,
            segment_ids=segment_ids,
            positions=positions,
            causal=False,
            scale=self.head_dim**-0.5,
        )
        # Tagged so the ``save_attention`` remat policy keeps it (core.attention).
        o = checkpoint_name(o, ATTENTION_OUT)
        return self.out_proj(o.reshape(n, p, -1))


class MLP(nnx.Module):
    """fc1 -> GELU (tanh approximation for ``gelu_pytorch_tanh``) -> fc2."""

    def __init__(self, vision_cfg: VisionConfig, *, param_dtype, compute_dtype, rngs: nnx.Rngs):
        kwargs = dict(param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)
        self.act = vision_cfg.hidden_act
        self.fc1 = Dense(
            vision_cfg.hidden_size,
            vision_cfg.intermediate_size,
            axes=(VISION_EMBED, VISION_MLP),
            **kwargs,
        )
        self.fc2 = Dense(
            vision_cfg.intermediate_size,
            vision_cfg.hidden_size,
            axes=(VISION_MLP, VISION_EMBED),
            **kwargs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu(self.fc1(x), self.act))


class EncoderLayer(nnx.Module):
    """Pre-LN transformer block: ``x += attn(LN1(x)); x += MLP(LN2(x))``."""

    def __init__(self, vision_cfg: VisionConfig, *, param_dtype, compute_dtype, rngs: nnx.Rngs):
        kwargs = dict(param_dtype=param_dtype, compute_dtype=compute_dtype)
        d, eps = vision_cfg.hidden_size, vision_cfg.layer_norm_eps
        self.layer_norm1 = LayerNorm(d, eps=eps, **kwargs)
        self.self_attn = SelfAttention(vision_cfg, rngs=rngs, **kwargs)
        self.layer_norm2 = LayerNorm(d, eps=eps, **kwargs)
        self.mlp = MLP(vision_cfg, rngs=rngs, **kwargs)

    def __call__(self, x: jax.Array, attn_fn: AttentionFn) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), attn_fn)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nnx.Module):
    """``layers_used`` stacked encoder layers run with scan (+ remat)."""

    def __init__(
        self, vision_cfg: VisionConfig, n: int, *, param_dtype, compute_dtype, rngs: nnx.Rngs
    ):
        kwargs = dict(param_dtype=param_dtype, compute_dtype=compute_dtype)
        self.layers = stack_layers(lambda r: EncoderLayer(vision_cfg, rngs=r, **kwargs), n, rngs)

    def __call__(self, x: jax.Array, attn_fn: AttentionFn, remat: str) -> jax.Array:
        return scan_layers(self.layers, x, remat=remat, call=lambda layer, h: layer(h, attn_fn))


class VisionTower(nnx.Module):
    """SigLIP features ``hidden_states[select_layer]`` for every patch token.

    Args:
      cfg: the whole model config (reads ``cfg.vision``, dtypes and remat policy).
      rngs: parameter initialisation keys.
      attn_fn: attention kernel (bidirectional; segment ids all 1).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, attn_fn: AttentionFn = dense_attention):
        vision_cfg = cfg.vision
        if vision_cfg.layers_used < 1:
            raise ConfigError(
                "vision.select_layer", "must select the output of at least one encoder layer"
            )
        self.cfg = cfg
        self.attn_fn = attn_fn
        kwargs = dict(
            param_dtype=jnp.dtype(cfg.param_dtype), compute_dtype=jnp.dtype(cfg.compute_dtype)
        )
        self.embeddings = Embeddings(vision_cfg, rngs=rngs, **kwargs)
        self.encoder = Encoder(vision_cfg, vision_cfg.layers_used, rngs=rngs, **kwargs)

    def __call__(self, pixel_values: jax.Array, *, attn_fn: AttentionFn | None = None) -> jax.Array:
        """Vision features.

        Args:
          pixel_values: [N, H, W, C] float, already normalised; H = W = ``vision.image_size``.
          attn_fn: overrides the constructor's attention kernel for this call.

        Returns:
          [N, num_patches, vision.hidden_size] in compute dtype.
        """
        vision_cfg = self.cfg.vision
        want = (vision_cfg.image_size, vision_cfg.image_size, vision_cfg.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(
                f"pixel_values must have shape [N, {want[0]}, {want[1]}, {want[2]}] (NHWC), "
                f"got {tuple(pixel_values.shape)}"
            )
        x = self.embeddings(pixel_values)
        return self.encoder(x, attn_fn or self.attn_fn, self.cfg.remat)
