"""One autoregressive decode step over the sequence-sharded KV cache (MM-SP decoding).

The whole step is one ``jax.shard_map`` over the mesh. The new token's embedding, projections
and MLPs are tiny and computed redundantly on every device (parameters replicated); what is
distributed is the cache. Per layer, every device:

1. computes q, k, v of the new token with the model's own ``DecoderLayer`` (the attention kernel
   slot is filled by the function below, so projections, RoPE and MLP are the model's code);
2. appends k, v to the cache if it owns this step's slot (round-robin, ``cache.append_slot``);
3. attends q to its local cache shard only, giving a partial output o_n and its log-sum-exp
   lse_n (fp32, ``parallel.ring.block_forward``, the ring's block kernel);
4. combines the N partials exactly: m = pmax(lse_n); w_n = exp(lse_n - m);
   o = psum(w_n * o_n) / psum(w_n). Two small all-reduces per layer: B*H fp32 for the max and
   B*H*(D+1) fp32 for the packed numerator/denominator, i.e. a few KB per token per layer,
   independent of the context length.

Nothing of the cache moves. ``combine="gather"`` is the baseline for benchmarks: each layer
all-gathers the whole cache (K, V and metadata) and attends to it on every device, which is what
a replicated-attention decode over a sharded cache costs (O(L * D_kv) bytes per token per layer,
like rotating the cache around the ring as LWM does).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from longvila_jax.infer.cache import KVCache, SeqMesh, append_slot, cache_specs, write_local
from longvila_jax.models.llm import rope_tables
from longvila_jax.parallel.ring import block_forward

COMBINES = ("lse", "gather")


def combine_partials(o: jax.Array, lse: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """Exact softmax merge of per-shard attention partials (inside ``shard_map``).

    Args:
      o: [b, 1, h, d] fp32 local output, normalised over the local keys (0 if none visible).
      lse: [b, h, 1] fp32 local log-sum-exp (very negative when no local key is visible).
      axes: the mesh axes holding the shards.

    Returns:
      [b, 1, h, d] fp32: attention over the union of all shards' keys.
    """
    if not axes:
        return o
    m = jax.lax.pmax(lse, axes)
    w = jnp.exp(lse - m).transpose(0, 2, 1)[..., None]  # [b, 1, h, 1]; 0 for empty shards
    packed = jnp.concatenate([o * w, w], axis=-1)  # one all-reduce for numerator and weight
    total = jax.lax.psum(packed, axes)
    return total[..., :-1] / total[..., -1:]


def _local_attention(q, k, v, kv_seg, kv_pos, q_seg, q_pos, scale, seq_mesh: SeqMesh, combine: str):
    if combine == "gather":
        axes = seq_mesh.seq_axes
        if axes:
            k, v, kv_seg, kv_pos = (
                jax.lax.all_gather(x, axes, axis=1, tiled=True) for x in (k, v, kv_seg, kv_pos)
            )
        o, _ = block_forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, causal=True, scale=scale)
        return o
    o, lse = block_forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, causal=True, scale=scale)
    return combine_partials(o, lse, seq_mesh.seq_axes)


def decode_step_local(
    model,
    cache: KVCache,
    tokens: jax.Array,
    positions: jax.Array,
    step: jax.Array,
    *,
    seq_mesh: SeqMesh,
    combine: str = "lse",
) -> tuple[KVCache, jax.Array]:
    """The body of the decode ``shard_map`` (local shapes; B_l = batch per batch shard).

    Args:
      model: ``LongVILA`` with replicated parameters.
      cache: the local cache shard (k, v [L, B_l, C, Hkv, D]; positions, segment_ids [B_l, C]).
      tokens: [B_l] int32 ids of the tokens to append (the last sampled ones).
      positions: [B_l] int32 their natural positions.
      step: int32 scalar decode step (0 for the first token after the prompt).
      seq_mesh: the mesh; combine: "lse" (local attention + LSE merge) or "gather" (baseline).

    Returns:
      (updated local cache, logits [B_l, vocab] fp32 of the next token).
    """
    llm_cfg = model.cfg.llm
    owner, offset = append_slot(step, cache.base, seq_mesh.num_shards)
    mine = seq_mesh.shard_index() == owner
    q_pos = positions[:, None].astype(jnp.int32)
    q_seg = jnp.ones_like(q_pos)
    zero = jnp.zeros((), jnp.int32)
    kv_pos = write_local(cache.positions, q_pos, (zero, offset), mine)
    kv_seg = write_local(cache.segment_ids, q_seg, (zero, offset), mine)

    x = model.llm.embed(tokens[:, None]).astype(jnp.dtype(model.cfg.compute_dtype))
    cos, sin = rope_tables(
        q_pos, llm_cfg.dim_per_head, llm_cfg.rope_theta, llm_cfg.rope_position_scale
    )
    layers_def, layers_state = nnx.split(model.llm.layers)
    view = (1, *cache.k.shape[1:])

    def body(carry, xs):
        # The whole cache is carried and updated by one-token writes; scanning it as xs/ys
        # would rewrite every layer's cache on every token.
        x, cache_k, cache_v = carry
        layer_state, i = xs
        layer = nnx.merge(layers_def, layer_state)
        out = {}

        def attend(q, k, v, *, segment_ids, positions, causal, scale):
            written_k = write_local(cache_k, k[None], (i, zero, offset, zero, zero), mine)
            written_v = write_local(cache_v, v[None], (i, zero, offset, zero, zero), mine)
            layer_k = jax.lax.dynamic_slice(written_k, (i, zero, zero, zero, zero), view)[0]
            layer_v = jax.lax.dynamic_slice(written_v, (i, zero, zero, zero, zero), view)[0]
            o = _local_attention(
                q,
                layer_k,
                layer_v,
                kv_seg,
                kv_pos,
                segment_ids,
                positions,
                scale,
                seq_mesh,
                combine,
            )
            out["cache"] = (written_k, written_v)  # returned through the scan carry below
            return o.astype(q.dtype)

        x = layer(x, cos, sin, q_pos, q_seg, attend)
        return (x, *out["cache"]), None

    xs = (layers_state, jnp.arange(cache.k.shape[0], dtype=jnp.int32))
    (x, k_new, v_new), _ = jax.lax.scan(body, (x, cache.k, cache.v), xs)
    logits = model.llm.logits(model.llm.norm(x))[:, 0]
    return KVCache(k_new, v_new, kv_pos, kv_seg, cache.base), logits


def decode_step_fn(
    graphdef, seq_mesh: SeqMesh, *, combine: str = "lse"
) -> Callable[..., tuple[KVCache, jax.Array]]:
    """Unjitted ``step(state, cache, tokens[B], positions[B], step) -> (cache, logits[B, V])``
    (one ``shard_map`` over the mesh), for embedding in a larger jitted function.

    Args:
      graphdef: ``nnx.split(model)[0]`` of the ``LongVILA`` model; ``state`` is its state.
      seq_mesh: the mesh.
      combine: "lse" (MM-SP decode) or "gather" (all-gather baseline).
    """
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    specs = cache_specs(seq_mesh)
    batch = seq_mesh.spec("batch")

    def body(state, cache, tokens, positions, step):
        model = nnx.merge(graphdef, state)
        return decode_step_local(
            model, cache, tokens, positions, step, seq_mesh=seq_mesh, combine=combine
        )

    def step_fn(state, cache, tokens, positions, step):
        return jax.shard_map(
            body,
            mesh=seq_mesh.mesh,
            in_specs=(P(), specs, batch, batch, P()),
            out_specs=(specs, seq_mesh.spec("batch", None)),
            check_vma=False,
        )(state, cache, tokens.astype(jnp.int32), positions.astype(jnp.int32), step)

    return step_fn


def make_decode_step(
    graphdef, seq_mesh: SeqMesh, *, combine: str = "lse", compiler_options: dict | None = None
) -> Callable[..., tuple[KVCache, jax.Array]]:
    """:func:`decode_step_fn` under ``jax.jit``; the cache argument is donated (updated in
    place). Shapes are static for a given cache, so the step compiles once per (batch, cache
    capacity). ``compiler_options`` go to ``jax.jit``.
    """
    step_fn = decode_step_fn(graphdef, seq_mesh, combine=combine)
    return jax.jit(step_fn, donate_argnums=(1,), compiler_options=compiler_options)


__all__ = [
    "COMBINES",
    "combine_partials",
    "decode_step_fn",
    "decode_step_local",
    "make_decode_step",
]
