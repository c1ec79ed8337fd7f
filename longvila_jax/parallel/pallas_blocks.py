"""Fused flash-attention block kernels in Pallas (forward here; backward in ``pallas_backward``).

``pallas_forward`` has exactly the contract of ``ring_kernels.chunked_forward`` (same
arguments, heads-major layouts, fp32 o normalised over this block's keys and fp32 LSE, 0 and
MASK_VALUE on rows with no visible key), so the ring can run either. Unlike the XLA kernel it
never materialises a [tq, tk] score tensor in memory: a grid program owns one (batch, KV head,
query head, query tile) and loops over KV tiles with an online softmax kept in fp32 (running
max m, denominator l, unnormalised accumulator; bf16 operands, fp32 dot accumulation).

GQA / MQA are native: the grid runs over (KV head, query head of that group) and each program
indexes its KV head's K/V, which are never repeated.

Masks come only from the data, as in the XLA kernels: a key is visible when it has the query's
non-zero segment id and, when causal, a position <= the query's. Positions may be any order
(the zigzag layout's blocks are not contiguous), so a tile is skipped from the min/max ranges
of its segment ids and positions (``tile_ranges``, ``tiles_may_attend``), never from its
index: a causal-diagonal block skips the tiles above its diagonal, a packed row the tiles of
other samples, and the result does not depend on the skip (a skipped tile has no visible pair).

Triton constraints shape the wrapper: every tile is a power of two >= 16, the head dimension is
zero-padded to a power of two >= 16 (zero columns change no score and come out as zero
columns), and block lengths are padded to a multiple of the tile with segment id 0 (padding is
invisible both ways) and sliced off. On a GPU backend ``pl.pallas_call`` lowers through Triton;
elsewhere it runs in Pallas' interpreter (``block_kernel.interpret_pallas``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from longvila_jax.core.attention import MASK_VALUE
from longvila_jax.parallel.block_kernel import interpret_pallas

_INT_MAX = 2**31 - 1  # a Python int, so kernels close over no array constant
MIN_TILE = 16  # Triton's smallest dot operand side


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tile sizes of one kernel (powers of two >= 16) and its Triton launch parameters.

    Attributes:
      q: query rows per tile; kv: keys per tile (capped by ``kv_chunk`` when one is given).
      num_warps, num_stages: Triton ``CompilerParams`` (ignored by the interpreter).
    """

    q: int = 64
    kv: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("q", "kv"):
            size = getattr(self, name)
            if size < MIN_TILE or size & (size - 1):
                raise ValueError(f"Tiles.{name}: must be a power of two >= {MIN_TILE}, got {size}")


FORWARD_TILES = Tiles(q=64, kv=64)


def fit_tile(preferred: int, length: int, kv_chunk: int | None = None) -> int:
    """The tile for a block of ``length`` tokens: ``preferred``, capped by the largest power of
    two <= ``kv_chunk`` (when given) and by ``length`` rounded up to a power of two, >= 16."""
    tile = preferred
    if kv_chunk:
        tile = min(tile, 1 << (max(kv_chunk, 1).bit_length() - 1))
    tile = min(tile, _next_power_of_two(length))
    return max(tile, MIN_TILE)


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``n`` (a padded block length)."""
    return -(-n // multiple) * multiple


def head_dim_padded(d: int) -> int:
    """Triton loads power-of-two shapes: the head dimension is padded to one (>= 16)."""
    return max(MIN_TILE, _next_power_of_two(d))


def pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
    """``x`` zero-padded at the end of ``axis`` to ``size`` (a no-op when already there)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _varying_axes(x: jax.Array) -> frozenset:
    return getattr(getattr(jax.typeof(x), "manual_axis_type", None), "varying", frozenset())


def align_varying(*operands: jax.Array) -> list[jax.Array]:
    """Marks every operand as varying over the union of their manual mesh axes.

    Inside ``jax.shard_map`` (check_vma) a ``pallas_call`` must declare how its outputs vary;
    with every operand varying alike, each output varies like any one of them (``out_struct``).
    Outside a shard_map there are no manual axes and this returns the operands unchanged.
    """
    union = frozenset().union(*(_varying_axes(x) for x in operands))
    out = []
    for x in operands:
        missing = tuple(sorted(union - _varying_axes(x)))
        out.append(jax.lax.pcast(x, missing, to="varying") if missing else x)
    return out


def out_struct(shape: tuple[int, ...], dtype, like: jax.Array) -> jax.ShapeDtypeStruct:
    """An output shape that varies over the manual axes of ``like`` (see ``align_varying``)."""
    if not _varying_axes(like):
        return jax.ShapeDtypeStruct(shape, dtype)
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).manual_axis_type)


def compiler_params(tiles: Tiles, interpret: bool):
    """Triton launch parameters; None in the interpreter, which takes none."""
    if interpret:
        return None
    return plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """2-D matmul with fp32 accumulation, contracting axis ``contract[0]`` of ``a`` with axis
    ``contract[1]`` of ``b`` (Triton transposes the operand itself; no copy in memory)."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def tile_ranges(segment_ids: jax.Array, positions: jax.Array) -> tuple[jax.Array, ...]:
    """Scalars (min segment, max segment, min position, max position) over the non-padding
    tokens of a tile; an all-padding tile gives an empty segment range (min > max)."""
    valid = segment_ids != 0
    return (
        jnp.min(jnp.where(valid, segment_ids, _INT_MAX)),
        jnp.max(jnp.where(valid, segment_ids, -1)),
        jnp.min(jnp.where(valid, positions, _INT_MAX)),
        jnp.max(jnp.where(valid, positions, -_INT_MAX)),
    )


def tiles_may_attend(q_ranges, kv_ranges, causal: bool) -> jax.Array:
    """Scalar bool, a necessary condition for a visible pair between two tiles: their segment
    ranges overlap and, when causal, the earliest key is not after the latest query."""
    q_min_segment, q_max_segment, _, q_max_position = q_ranges
    kv_min_segment, kv_max_segment, kv_min_position, _ = kv_ranges
    may = (q_max_segment >= kv_min_segment) & (kv_max_segment >= q_min_segment)
    return may & (kv_min_position <= q_max_position) if causal else may


def visible(q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal: bool, kv_major=False):
    """Visibility of a tile pair: [tq, tk], or [tk, tq] when ``kv_major`` (the dK/dV kernel
    works on transposed scores); ``ring_kernels._visible`` semantics."""
    if kv_major:
        q_segment, kv_segment = q_segment_ids[None, :], kv_segment_ids[:, None]
        q_position, kv_position = q_positions[None, :], kv_positions[:, None]
    else:
        q_segment, kv_segment = q_segment_ids[:, None], kv_segment_ids[None, :]
        q_position, kv_position = q_positions[:, None], kv_positions[None, :]
    seen = (q_segment == kv_segment) & (q_segment != 0)
    return seen & (kv_position <= q_position) if causal else seen


def _forward_kernel(q_ref, k_ref, v_ref, q_segment_ref, kv_segment_ref, q_position_ref,
                    kv_position_ref, o_ref, lse_ref, *, causal: bool, scale: float,
                    block_kv: int):  # fmt: skip
    """One query tile [bq, d] against every KV tile of its KV head (refs [tk, d])."""
    q = q_ref[...]
    q_segment_ids, q_positions = q_segment_ref[...], q_position_ref[...]
    q_ranges = tile_ranges(q_segment_ids, q_positions)
    rows = q.shape[0]

    def kv_tile(j, carry):
        cols = pl.ds(j * block_kv, block_kv)
        kv_segment_ids, kv_positions = kv_segment_ref[cols], kv_position_ref[cols]

        def attend(carry):
            acc, m, denom = carry
            s = dot(q, k_ref[cols, :], (1, 1)) * scale  # [bq, bkv] fp32
            seen = visible(q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal)
            s = jnp.where(seen, s, MASK_VALUE)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            # A row that has seen no key yet keeps m = MASK_VALUE, so its masked scores give
            # p = 1: harmless, since the first visible key makes alpha = exp(MASK - m) = 0 and
            # a row that never sees one is zeroed at the end (the XLA kernel's convention).
            alpha = jnp.exp(m - m_new)
            p = jnp.exp(s - m_new[:, None])
            v = v_ref[cols, :]
            acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v, (1, 0))
            return acc, m_new, denom * alpha + jnp.sum(p, axis=1)

        may = tiles_may_attend(q_ranges, tile_ranges(kv_segment_ids, kv_positions), causal)
        return jax.lax.cond(may, attend, lambda carry: carry, carry)

    start = (
        jnp.zeros((rows, q.shape[1]), jnp.float32),
        jnp.full((rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    acc, m, denom = jax.lax.fori_loop(0, k_ref.shape[0] // block_kv, kv_tile, start)
    row_has_key = m > 0.5 * MASK_VALUE
    # Both where branches are evaluated: a keyless row's 1 / 0 or log(0) is never selected.
    o_ref[...] = acc * jnp.where(row_has_key, 1.0 / denom, 0.0)[:, None]
    lse_ref[...] = jnp.where(row_has_key, m + jnp.log(denom), MASK_VALUE)


def pallas_forward(qh, kh, vh, q_segment_ids, kv_segment_ids, q_positions, kv_positions, *,
                   causal: bool, scale: float, kv_chunk: int | None = None,
                   interpret: bool | None = None, tiles: Tiles = FORWARD_TILES):  # fmt: skip
    """One block's forward as a fused Pallas kernel; ``chunked_forward``'s contract.

    Args:
      qh: [b, hkv, g, tq, d]; kh, vh: [b, hkv, tk, d] (bf16 or fp32); q_segment_ids,
        q_positions: [b, tq]; kv_segment_ids, kv_positions: [b, tk] int (0 = padding).
      causal, scale: the mask and the softmax scale.
      kv_chunk: caps the KV tile (the largest power of two <= kv_chunk, at least 16).
      interpret: run in Pallas' interpreter (default: whenever the backend is not a GPU).
      tiles: tile sizes (each capped by the padded block length).

    Returns:
      o: [b, hkv, g, tq, d] fp32 normalised over this block's keys; lse: [b, hkv, g, tq] fp32
      (MASK_VALUE on rows with no visible key, whose o is 0).
    """
    interpret = interpret_pallas(interpret)
    b, hkv, g, tq, d = qh.shape
    tk = kh.shape[2]
    block_q, block_kv = fit_tile(tiles.q, tq), fit_tile(tiles.kv, tk, kv_chunk)
    tq_pad, tk_pad, d_pad = round_up(tq, block_q), round_up(tk, block_kv), head_dim_padded(d)
    qh = pad_to(pad_to(qh, 3, tq_pad), 4, d_pad)
    kh, vh = (pad_to(pad_to(x, 2, tk_pad), 3, d_pad) for x in (kh, vh))
    q_meta = [pad_to(x.astype(jnp.int32), 1, tq_pad) for x in (q_segment_ids, q_positions)]
    kv_meta = [pad_to(x.astype(jnp.int32), 1, tk_pad) for x in (kv_segment_ids, kv_positions)]
    operands = align_varying(qh, kh, vh, q_meta[0], kv_meta[0], q_meta[1], kv_meta[1])

    q_tile = pl.BlockSpec((None, None, None, block_q, d_pad), lambda i, k, h, t: (i, k, h, t, 0))
    kv_all = pl.BlockSpec((None, None, tk_pad, d_pad), lambda i, k, h, t: (i, k, 0, 0))
    q_meta_tile = pl.BlockSpec((None, block_q), lambda i, k, h, t: (i, t))
    kv_meta_all = pl.BlockSpec((None, tk_pad), lambda i, k, h, t: (i, 0))
    lse_tile = pl.BlockSpec((None, None, None, block_q), lambda i, k, h, t: (i, k, h, t))
    kernel = functools.partial(_forward_kernel, causal=causal, scale=scale, block_kv=block_kv)
    o, lse = pl.pallas_call(
        kernel,
        grid=(b, hkv, g, tq_pad // block_q),
        in_specs=[q_tile, kv_all, kv_all, q_meta_tile, kv_meta_all, q_meta_tile, kv_meta_all],
        out_specs=[q_tile, lse_tile],
        out_shape=[
            out_struct((b, hkv, g, tq_pad, d_pad), jnp.float32, operands[0]),
            out_struct((b, hkv, g, tq_pad), jnp.float32, operands[0]),
        ],
        interpret=interpret,
        compiler_params=compiler_params(tiles, interpret),
        name="ring_block_forward",
    )(*operands)
    return o[..., :tq, :d], lse[..., :tq]
