"""Decoder-only LLM: Llama (Llama-3) and Qwen2, HF maths, pluggable attention kernel.

Port of ``transformers/models/{llama,qwen2}/modeling_*.py`` (transformers 5.24.0): pre-RMSNorm
blocks with grouped-query attention (q/k/v bias for Qwen2, o bias for Llama ``attention_bias``),
SwiGLU MLP, RoPE in HF's ``rotate_half`` convention (the two halves of each head are the
rotation pairs), HF linear scaling (inverse frequencies divided by the factor, i.e. positions
/ factor), and tied or untied output embeddings.

Positions and segment ids always come from the caller: packing restarts positions per sample,
and sequence parallelism permutes tokens, so neither may be derived from the array index. The
attention kernel is an ``AttentionFn`` fixed at construction and overridable per call.

The head is separate from the trunk (:meth:`LLM.hidden`, :meth:`LLM.logits`) so the loss can be
computed in chunks without materialising [B, T, V] logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from longvila_jax.config.model import LLMConfig, ModelConfig
from longvila_jax.core.attention import ATTENTION_OUT, AttentionFn, dense_attention
from longvila_jax.core.axes import EMBED, HEADS, KV_HEADS, MLP, VOCAB
from longvila_jax.models.layers import (
    Dense,
    Embed,
    RMSNorm,
    scan_layers,
    stack_layers,
)


def rope_tables(
    positions: jax.Array, head_dim: int, theta: float, position_scale: float
) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables of HF RoPE, in fp32.

    Args:
      positions: [B, T] int token positions.
      head_dim: rotary dimension (the full head dim).
      theta: RoPE base.
      position_scale: HF linear scaling factor (1 = none); angles use positions / factor.

    Returns:
      (cos, sin), each [B, T, head_dim] fp32; both halves repeat the same frequencies.
    """
    exponent = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    # HF divides the inverse frequencies by the factor (same product as positions / factor).
    inv_freq = (1.0 / (jnp.float32(theta) ** exponent)) / jnp.float32(position_scale)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, H, D] rotated by cos/sin [B, T, D] (``rotate_half`` convention), in x's dtype."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


class Attention(nnx.Module):
    """GQA self-attention (``num_key_value_heads`` <= ``num_attention_heads``, MQA at 1)."""

    def __init__(self, llm_cfg: LLMConfig, *, param_dtype, compute_dtype, rngs: nnx.Rngs):
        d, head_dim = llm_cfg.hidden_size, llm_cfg.dim_per_head
        h, hkv = llm_cfg.num_attention_heads, llm_cfg.num_key_value_heads
        kwargs = dict(param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = h, hkv, head_dim
        qkv_kwargs = dict(use_bias=llm_cfg.qkv_bias, **kwargs)
        self.q_proj = Dense(d, h * head_dim, axes=(EMBED, HEADS), **qkv_kwargs)
        self.k_proj = Dense(d, hkv * head_dim, axes=(EMBED, KV_HEADS), **qkv_kwargs)
        self.v_proj = Dense(d, hkv * head_dim, axes=(EMBED, KV_HEADS), **qkv_kwargs)
        self.o_proj = Dense(h * head_dim, d, axes=(HEADS, EMBED), use_bias=llm_cfg.o_bias, **kwargs)

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array,
        attn_fn: AttentionFn,
    ) -> jax.Array:
        """[B, T, D] -> [B, T, D]; causal within equal segment ids."""
        b, t, _ = x.shape
        q = apply_rope(self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        o = attn_fn(
            q,
            k,
            v,
            segment_ids=segment_ids,
            positions=positions,
            causal=True,
            scale=self.head_dim**-0.5,
        )
        # Tagged so the ``save_attention`` remat policy keeps it (core.attention).
        o = checkpoint_name(o, ATTENTION_OUT)
        return self.o_proj(o.reshape(b, t, -1))


class SwiGLU(nnx.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, llm_cfg: LLMConfig, *, param_dtype, compute_dtype, rngs: nnx.Rngs):
        d, f = llm_cfg.hidden_size, llm_cfg.intermediate_size
        kwargs = dict(param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)
        self.gate_proj = Dense(d, f, axes=(EMBED, MLP), use_bias=llm_cfg.mlp_bias, **kwargs)
        self.up_proj = Dense(d, f, axes=(EMBED, MLP), use_bias=llm_cfg.mlp_bias, **kwargs)
        self.down_proj = Dense(f, d, axes=(MLP, EMBED), use_bias=llm_cfg.mlp_bias, **kwargs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """``x += attn(RMSNorm(x)); x += mlp(RMSNorm(x))``."""

    def __init__(self, llm_cfg: LLMConfig, *, param_dtype, compute_dtype, rngs: nnx.Rngs):
        kwargs = dict(param_dtype=param_dtype, compute_dtype=compute_dtype)
        self.input_layernorm = RMSNorm(llm_cfg.hidden_size, eps=llm_cfg.rms_norm_eps, **kwargs)
        self.self_attn = Attention(llm_cfg, rngs=rngs, **kwargs)
        self.post_attention_layernorm = RMSNorm(
            llm_cfg.hidden_size, eps=llm_cfg.rms_norm_eps, **kwargs
        )
        self.mlp = SwiGLU(llm_cfg, rngs=rngs, **kwargs)

    def __call__(self, x, cos, sin, positions, segment_ids, attn_fn: AttentionFn) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, segment_ids, attn_fn)
        return x + self.mlp(self.post_attention_layernorm(x))


class LLM(nnx.Module):
    """Llama / Qwen2 causal LM.

    Args:
      cfg: the whole model config (reads ``cfg.llm``, dtypes and remat policy).
      rngs: parameter initialisation keys.
      attn_fn: default attention kernel; every call may override it.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, attn_fn: AttentionFn = dense_attention):
        llm_cfg = cfg.llm
        self.cfg = cfg
        self.attn_fn = attn_fn
        kwargs = dict(
            param_dtype=jnp.dtype(cfg.param_dtype), compute_dtype=jnp.dtype(cfg.compute_dtype)
        )
        d = llm_cfg.hidden_size
        self.embed_tokens = Embed(llm_cfg.vocab_size, d, axes=(VOCAB, EMBED), rngs=rngs, **kwargs)
        self.layers = stack_layers(
            lambda r: DecoderLayer(llm_cfg, rngs=r, **kwargs), llm_cfg.num_hidden_layers, rngs
        )
        self.norm = RMSNorm(d, eps=llm_cfg.rms_norm_eps, **kwargs)
        self.lm_head = (
            None
            if llm_cfg.tie_word_embeddings
            else Dense(
                d, llm_cfg.vocab_size, axes=(EMBED, VOCAB), use_bias=False, rngs=rngs, **kwargs
            )
        )

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """[B, T] ids in [0, vocab_size) -> [B, T, D] (media ids must be masked by the caller)."""
        return self.embed_tokens(input_ids)

    def hidden(
        self,
        *,
        input_ids: jax.Array | None = None,
        inputs_embeds: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        attn_fn: AttentionFn | None = None,
    ) -> jax.Array:
        """Final (normed) hidden states.

        Args:
          input_ids: [B, T] int token ids; exactly one of ``input_ids`` / ``inputs_embeds``.
          inputs_embeds: [B, T, D] input embeddings.
          positions: [B, T] int32 RoPE / causal positions; default ``arange(T)`` per row.
          segment_ids: [B, T] int32; attention stays within equal ids, 0 = padding; default 1.
          attn_fn: overrides the constructor's attention kernel.

        Returns:
          [B, T, D] in compute dtype.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if input_ids is not None else inputs_embeds
        x = x.astype(jnp.dtype(self.cfg.compute_dtype))
        b, t = x.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        for name, arr in (("positions", positions), ("segment_ids", segment_ids)):
            if tuple(arr.shape) != (b, t):
                raise ValueError(f"{name} must have shape {(b, t)}, got {tuple(arr.shape)}")
        llm_cfg = self.cfg.llm
        cos, sin = rope_tables(
            positions, llm_cfg.dim_per_head, llm_cfg.rope_theta, llm_cfg.rope_position_scale
        )
        attention = attn_fn or self.attn_fn

        def call(layer, h, cos, sin, positions, segment_ids):
            return layer(h, cos, sin, positions, segment_ids, attention)

        x = scan_layers(
            self.layers, x, cos, sin, positions, segment_ids, remat=self.cfg.remat, call=call
        )
        return self.norm(x)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[..., D] final hidden states -> [..., vocab_size] fp32 logits."""
        head = self.embed_tokens.attend if self.lm_head is None else self.lm_head
        return head(hidden).astype(jnp.float32)

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        attn_fn: AttentionFn | None = None,
    ) -> jax.Array:
        """Logits [B, T, vocab_size] (fp32); arguments as :meth:`hidden`."""
        h = self.hidden(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            positions=positions,
            segment_ids=segment_ids,
            attn_fn=attn_fn,
        )
        return self.logits(h)
