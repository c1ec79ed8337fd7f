"""Which rows each process reads, and how its rows become global device arrays.

The unit of data loading is the *data shard*: the batch groups (coordinates along the mesh's
``batch`` axes, i.e. data-parallel groups) whose devices one process holds. The mesh puts the
devices in (process, id) order with ``ulysses`` innermost (``parallel.mesh.make_mesh``), so two
layouts arise:

* a process holds one or more whole sequence-parallel groups (ring and Ulysses inside a host,
  or pure data parallelism): every process is its own shard;
* a sequence-parallel group spans several processes (``ring`` across hosts, e.g.
  ``cpu8_r2u4.yaml`` on 2 x 4 devices): those processes form one shard, read *the same rows*,
  and each supplies the (batch, sequence) slices its own devices hold.

Anything else (a process holding part of one group and part of another) is rejected. Shard s of
n reads ``dataset[s::n]`` and supplies the global rows ``[s * b, (s + 1) * b)`` of every
micro-batch (``b`` = rows per shard and micro-batch): the batch groups of a shard are
contiguous, and the global row order is group-major. :meth:`DataShard.global_array` builds the
global array with ``jax.make_array_from_callback``: each addressable device gets its
(rows, sequence, ...) block cut out of the shard's host array.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding


@dataclass(frozen=True)
class DataShard:
    """This process's data shard.

    Attributes:
      index: shard of this process (processes with equal ``index`` read identical rows).
      count: number of distinct shards (global rows = rows per shard x ``count``).
    """

    index: int = 0
    count: int = 1

    def global_array(self, local: np.ndarray, sharding: NamedSharding) -> jax.Array:
        """The shard's host array -> the global array (axis 1 is the batch-sharded axis).

        Args:
          local: [A, n, ...]: this shard's n rows (or batch groups) of every micro-batch, full
            along every other axis (the sequence axis included, even when it is sharded over
            processes).
          sharding: the global array's sharding (axis 1 over the batch axes only).

        Returns:
          A global [A, n * count, ...] array; with one process, exactly ``device_put``.

        Raises:
          RuntimeError: a device of this process holds rows outside the shard (the mesh and the
            shard disagree).
        """
        if jax.process_count() == 1:
            return jax.device_put(local, sharding)
        shape = (local.shape[0], local.shape[1] * self.count, *local.shape[2:])
        return jax.make_array_from_callback(shape, sharding, lambda i: self.block(local, i))

    def block(self, local: np.ndarray, index: tuple[slice, ...]) -> np.ndarray:
        """The part of the global array at ``index`` (a device's slices), cut from ``local``.

        Raises:
          RuntimeError: ``index`` reaches rows outside this shard.
        """
        n = local.shape[1]
        first = self.index * n  # the shard's first global row
        start, stop, _ = index[1].indices(n * self.count)
        if start < first or stop > first + n:
            raise RuntimeError(
                f"a device of this process needs rows [{start}, {stop}) but data shard "
                f"{self.index}/{self.count} holds [{first}, {first + n})"
            )
        return local[(index[0], slice(start - first, stop - first), *index[2:])]


def shard_of_processes(
    process_grid: np.ndarray, axis_names: Sequence[str], batch_axes: Sequence[str]
) -> tuple[list[int], int]:
    """Shard index of every process and the number of shards.

    Args:
      process_grid: int array shaped like the mesh: the process owning each device.
      axis_names: the mesh axis names, in order.
      batch_axes: the mesh axes sharding the rows, major first (the ``batch`` rule).

    Returns:
      (shard of process p for p = 0 .. P-1, number of shards).

    Raises:
      ValueError: a process holds part of one batch group and part of another, or processes
        hold unequal numbers of batch groups.
    """
    grid = np.asarray(process_grid)
    names = list(axis_names)
    axes = [a for a in batch_axes if a in names]
    # Batch-group coordinate of every device: row-major over the batch axes (PartitionSpec order).
    moved = np.moveaxis(grid, [names.index(a) for a in axes], list(range(len(axes))))
    n_groups = int(np.prod(moved.shape[: len(axes)]))
    per_group = moved.reshape(n_groups, -1)
    groups_of = {
        int(p): sorted({g for g in range(n_groups) if (per_group[g] == p).any()})
        for p in np.unique(grid)
    }
    sets = sorted({tuple(groups) for groups in groups_of.values()})
    sizes = {len(s) for s in sets}
    for a, b in zip(sets, sets[1:], strict=False):
        if set(a) & set(b):
            raise ValueError(
                f"batch groups {list(a)} and {list(b)} overlap across processes: a process must "
                "hold whole sequence-parallel groups, or a group whole processes"
            )
    if len(sizes) != 1 or any(list(s) != list(range(s[0], s[0] + len(s))) for s in sets):
        raise ValueError(f"processes hold unequal or scattered batch groups: {sets}")
    index = {s: i for i, s in enumerate(sets)}
    return [index[tuple(groups_of[p])] for p in sorted(groups_of)], len(sets)


def data_shard(mesh: Mesh, batch_axes: Sequence[str], process_index: int | None = None):
    """This process's :class:`DataShard` on ``mesh`` (``batch_axes``: the ``batch`` rule)."""
    grid = np.vectorize(lambda d: d.process_index, otypes=[np.int64])(mesh.devices)
    shards, count = shard_of_processes(grid, mesh.axis_names, batch_axes)
    process = jax.process_index() if process_index is None else process_index
    return DataShard(index=shards[process], count=count)


def count_data_shards(
    sizes: Mapping[str, int],
    axis_names: Sequence[str],
    batch_axes: Sequence[str],
    process_count: int,
) -> int:
    """Shards of a mesh with ``sizes`` laid out like ``make_mesh`` (devices in process order).

    Raises:
      ValueError: as :func:`shard_of_processes`, or devices not divisible among processes.
    """
    shape = [int(sizes[a]) for a in axis_names]
    n = int(np.prod(shape))
    if n % process_count:
        raise ValueError(f"{n} devices cannot be split among {process_count} processes")
    grid = (np.arange(n) // (n // process_count)).reshape(shape)
    return shard_of_processes(grid, axis_names, batch_axes)[1]


__all__ = ["DataShard", "count_data_shards", "data_shard", "shard_of_processes"]
