"""KV cache sharded along the sequence over the sequence-parallel mesh axes.

Geometry. The mesh's ``ring`` x ``ulysses`` devices are N = R * U flat sequence shards, shard
n = r * U + u (the order of ``P(..., ('ring', 'ulysses'))``). The cache holds C slots per shard,
so the global arrays have N * C slots and shard n owns slots [n * C, (n + 1) * C). The first
``base`` slots of every shard are the prompt exactly as the MM-SP prefill held it: the K/V of
shard n's piece of the 2D-zigzag layout (``parallel.layouts.zigzag_2d_permutation``), before the
Ulysses all-to-all. Nothing is moved after the prefill, so the cache is filled in the layout it
is read in.

Decoded tokens are appended round-robin: decode step t (0-based) writes its K/V into shard
``t % N`` at local slot ``base + t // N``. Every shard then grows by one slot every N steps, so
the per-token attention work stays balanced across devices (the step time is the slowest
shard's), and ``ceil(max_new / N)`` spare slots per shard suffice. Writing to the last shard with
free room would pile all new tokens onto one device. The order of slots never matters for the
result: visibility comes from the stored positions and segment ids (segment 0 = empty slot or
padding), exactly like the attention kernels.

Each slot's position is the token's natural (unpermuted) position, so RoPE and the causal mask
agree with a single-device computation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from longvila_jax.core import axes as ax


class KVCache(NamedTuple):
    """The decode state of every layer (a pytree; global arrays).

    Attributes:
      k, v: [layers, batch, N * C, kv_heads, head_dim] in the model's compute dtype, the
        sequence axis sharded over (ring, ulysses).
      positions: [batch, N * C] int32 natural token positions of the slots.
      segment_ids: [batch, N * C] int32; 1 for a filled slot, 0 for empty / padding.
      base: int32 scalar, prompt slots per shard (T_padded / N); decoded tokens start there.
    """

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    segment_ids: jax.Array
    base: jax.Array


@dataclasses.dataclass(frozen=True)
class SeqMesh:
    """The mesh seen by inference: batch axes, sequence axes and their sizes.

    Attributes:
      mesh: a mesh with Auto axis types (``parallel.mesh.make_mesh``).
      ring_axis, ulysses_axis: the sequence axes (ring major, Ulysses minor).
      batch_axes: mesh axes that shard the batch.
    """

    mesh: Mesh
    ring_axis: str = ax.RING
    ulysses_axis: str = ax.ULYSSES
    batch_axes: tuple[str, ...] = (ax.DATA, ax.FSDP)

    def _size(self, name: str) -> int:
        return int(self.mesh.shape[name]) if name in self.mesh.shape else 1

    @property
    def ring(self) -> int:
        return self._size(self.ring_axis)

    @property
    def ulysses(self) -> int:
        return self._size(self.ulysses_axis)

    @property
    def num_shards(self) -> int:
        """N = R * U sequence shards."""
        return self.ring * self.ulysses

    @property
    def seq_axes(self) -> tuple[str, ...]:
        return tuple(a for a in (self.ring_axis, self.ulysses_axis) if a in self.mesh.shape)

    @property
    def present_batch_axes(self) -> tuple[str, ...]:
        return tuple(a for a in self.batch_axes if a in self.mesh.shape)

    @property
    def batch_shards(self) -> int:
        return math.prod(self._size(a) for a in self.present_batch_axes)

    def spec(self, *dims: str | None) -> P:
        """PartitionSpec from 'batch' / 'seq' / None per dimension."""
        table = {"batch": self.present_batch_axes or None, "seq": self.seq_axes or None}
        return P(*(table[d] if d is not None else None for d in dims))

    def sharding(self, *dims: str | None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(*dims))

    def shard_index(self) -> jax.Array:
        """Inside ``shard_map``: this device's sequence shard n = r * U + u (int32 scalar)."""
        r = jax.lax.axis_index(self.ring_axis) if self.ring_axis in self.mesh.shape else 0
        u = jax.lax.axis_index(self.ulysses_axis) if self.ulysses_axis in self.mesh.shape else 0
        return jnp.asarray(r * self.ulysses + u, jnp.int32)

    def check_batch(self, batch: int) -> None:
        if batch % self.batch_shards:
            raise ValueError(
                f"batch {batch} is not divisible by the batch mesh axes "
                f"{self.present_batch_axes} (size {self.batch_shards})"
            )


def cache_specs(seq_mesh: SeqMesh) -> KVCache:
    """PartitionSpecs of a :class:`KVCache` (a KVCache of specs, usable as shard_map specs)."""
    kv = seq_mesh.spec(None, "batch", "seq", None, None)
    meta = seq_mesh.spec("batch", "seq")
    return KVCache(kv, kv, meta, meta, P())


def cache_shardings(seq_mesh: SeqMesh) -> KVCache:
    return jax.tree.map(lambda s: NamedSharding(seq_mesh.mesh, s), cache_specs(seq_mesh))


def new_slots_per_shard(max_new_tokens: int, num_shards: int, multiple: int = 8) -> int:
    """Spare slots per shard for ``max_new_tokens`` round-robin appends, rounded up to
    ``multiple`` so nearby token budgets share one compiled decode step."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    need = -(-max_new_tokens // num_shards)
    return -(-need // multiple) * multiple


def cache_from_prefill(
    k: jax.Array,
    v: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    seq_mesh: SeqMesh,
    new_slots: int,
) -> KVCache:
    """Builds the cache from the prefill's K/V, each shard padding its own piece (no traffic).

    Args:
      k, v: [layers, batch, T_p, kv_heads, head_dim] post-RoPE keys and values in the 2D zigzag
        layout, sequence-sharded over (ring, ulysses) as the prefill produced them.
      positions, segment_ids: [batch, T_p] int32 of the laid-out prompt (segment 0 = padding).
      seq_mesh: the mesh.
      new_slots: spare slots per shard for decoded tokens (``new_slots_per_shard``).

    Returns:
      A :class:`KVCache` with C = T_p / N + new_slots slots per shard.
    """
    t = k.shape[2]
    n = seq_mesh.num_shards
    if t % n:
        raise ValueError(f"prefill length {t} is not divisible by the {n} sequence shards")
    specs = cache_specs(seq_mesh)

    def body(k, v, pos, seg):
        pad5 = ((0, 0), (0, 0), (0, new_slots), (0, 0), (0, 0))
        pad2 = ((0, 0), (0, new_slots))
        return (
            jnp.pad(k, pad5),
            jnp.pad(v, pad5),
            jnp.pad(pos, pad2),
            jnp.pad(seg, pad2),  # 0 = empty slot: invisible until a decode step fills it
        )

    k, v, pos, seg = jax.shard_map(
        body,
        mesh=seq_mesh.mesh,
        in_specs=(specs.k, specs.v, specs.positions, specs.segment_ids),
        out_specs=(specs.k, specs.v, specs.positions, specs.segment_ids),
    )(k, v, positions.astype(jnp.int32), segment_ids.astype(jnp.int32))
    return KVCache(k, v, pos, seg, jnp.asarray(t // n, jnp.int32))


def append_slot(step: jax.Array, base: jax.Array, num_shards: int) -> tuple[jax.Array, jax.Array]:
    """Round-robin slot of decode step ``step``: (owning shard, local slot index)."""
    return step % num_shards, base + step // num_shards


def write_local(buf: jax.Array, value: jax.Array, start: Sequence, mine: jax.Array) -> jax.Array:
    """Writes ``value`` into a local shard at ``start`` when ``mine``; other shards keep theirs.

    Args:
      buf: the local shard, e.g. [layers, b, C, hkv, d] or [b, C].
      value: the new entry (same rank as ``buf``, size 1 along the slot axis).
      start: one int scalar per dimension of ``buf`` (layer index, slot index, zeros).
      mine: bool scalar, this shard owns the slot.

    Returns:
      ``buf`` with the entry written on the owning shard (a one-entry in-place update).
    """
    start = [jnp.asarray(s, jnp.int32) for s in start]
    old = jax.lax.dynamic_slice(buf, start, value.shape)
    return jax.lax.dynamic_update_slice(buf, jnp.where(mine, value.astype(buf.dtype), old), start)


__all__ = [
    "KVCache",
    "SeqMesh",
    "append_slot",
    "cache_from_prefill",
    "cache_shardings",
    "cache_specs",
    "new_slots_per_shard",
    "write_local",
]
