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

from longvila_jax.config.model import LLMConfig, ModelConfig
from longvila_jax.core.attention import AttentionFn, dense_attention
from longvila_jax.core.axes import EMBED, HEADS, KV_HEADS, MLP, VOCAB
from longvila_jax.models.layers import Dense, Embed, RMSNorm, scan_layers, stack_layers


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
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


class Attention(nnx.Module):
    """GQA self-attention (``num_key_value_heads`` <= ``num_attention_heads``, MQA at 1)."""

    def __init__(self, lc: LLMConfig, *, param_dtype, compute_dtype, rngs: nnx.Rngs):
        d, hd = lc.hidden_size, lc.dim_per_head
        h, hkv = lc.num_attention_heads, lc.num_key_value_heads
        kw = dict(param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = h, hkv, hd
        self.q_proj = Dense(d, h * hd, axes=(EMBED, HEADS), use_bias=lc.qkv_bias, **kw)
        self.k_proj = Dense(d, hkv * hd, axes=(EMBED, KV_HEADS), use_bias=lc.qkv_bias, **kw)
        self.v_proj = Dense(d, hkv * hd, axes=(EMBED, KV_HEADS), use_bias=lc.qkv_bias, **kw)
        self.o_proj = Dense(h * hd, d, axes=(HEADS, EMBED), use_bias=lc.o_bias, **kw)

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
        return self.o_proj(o.reshape(b, t, -1))


class SwiGLU(nnx.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, lc: LLMConfig, *, param_dtype, compute_dtype, rngs: nnx.Rngs):
        d, f = lc.hidden_size, lc.intermediate_size
        kw = dict(param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)
        self.gate_proj = Dense(d, f, axes=(EMBED, MLP), use_bias=lc.mlp_bias, **kw)
        self.up_proj = Dense(d, f, axes=(EMBED, MLP), use_bias=lc.mlp_bias, **kw)
        self.down_proj = Dense(f, d, axes=(MLP, EMBED), use_bias=lc.mlp_bias, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """``x += attn(RMSNorm(x)); x += mlp(RMSNorm(x))``."""

    def __init__(self, lc: LLMConfig, *, param_dtype, compute_dtype, rngs: nnx.Rngs):
        kw = dict(param_dtype=param_dtype, compute_dtype=compute_dtype)
        self.input_layernorm = RMSNorm(lc.hidden_size, eps=lc.rms_norm_eps, **kw)
        self.self_attn = Attention(lc, rngs=rngs, **kw)
        self.post_attention_layernorm = RMSNorm(lc.hidden_size, eps=lc.rms_norm_eps, **kw)
        self.mlp = SwiGLU(lc, rngs=rngs, **kw)

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
        lc = cfg.llm
        self.cfg = cfg
        self.attn_fn = attn_fn
        pd, cd = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.compute_dtype)
        kw = dict(param_dtype=pd, compute_dtype=cd)
        d = lc.hidden_size
        self.embed_tokens = Embed(lc.vocab_size, d, axes=(VOCAB, EMBED), rngs=rngs, **kw)
        self.layers = stack_layers(
            lambda r: DecoderLayer(lc, rngs=r, **kw), lc.num_hidden_layers, rngs
        )
        self.norm = RMSNorm(d, eps=lc.rms_norm_eps, **kw)
        self.lm_head = (
            None
            if lc.tie_word_embeddings
            else Dense(d, lc.vocab_size, axes=(EMBED, VOCAB), use_bias=False, rngs=rngs, **kw)
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
        lc = self.cfg.llm
        cos, sin = rope_tables(positions, lc.dim_per_head, lc.rope_theta, lc.rope_position_scale)
        fn = attn_fn or self.attn_fn

        def call(layer, h, cos, sin, positions, segment_ids):
            return layer(h, cos, sin, positions, segment_ids, fn)

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
