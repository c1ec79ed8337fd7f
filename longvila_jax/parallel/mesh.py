"""Device meshes from mesh files: sizes, logical-to-mesh rules, validation and device placement.

A mesh file (``configs/mesh/*.yaml``) gives the sizes of the axes ``data``, ``fsdp``, ``ring``
and ``ulysses`` (one may be -1: filled from the device count) and two rules tables mapping
logical axis names (``core/axes.py``) to mesh axes, one for activations and one for
parameters. ``validate_mesh`` checks everything that can be wrong before any compilation and
raises ``ConfigError`` naming the field. ``make_mesh`` orders devices so that ``ulysses`` groups
stay inside one process (host) and ``ring`` spans processes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import numpy as np
from jax.sharding import AxisType, Mesh
from jax.sharding import PartitionSpec as P

from longvila_jax.config.base import check, load_config
from longvila_jax.core import axes as ax
from longvila_jax.core.errors import brief
from longvila_jax.parallel.block_kernel import BLOCK_KERNELS, BlockKernel


def _default_activation_rules() -> dict[str, tuple[str, ...]]:
    return {
        ax.BATCH: (ax.DATA, ax.FSDP),
        ax.SEQ: (ax.RING, ax.ULYSSES),
        ax.FRAMES: (ax.RING, ax.ULYSSES),
    }


def _default_param_rules() -> dict[str, tuple[str, ...]]:
    return {ax.EMBED: (ax.FSDP,), ax.VISION_EMBED: (ax.FSDP,)}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes and logical-to-mesh rules (the schema of ``configs/mesh/*.yaml``).

    Attributes:
      data, fsdp, ring, ulysses: axis sizes; exactly one may be -1 (product fills the devices).
      block_size: attention block granularity; the sequence must be a multiple of
        2 * ring * ulysses * block_size.
      block_kernel: the ring's attention block kernels: "xla", "pallas" (fused flash tiles,
        Triton on a GPU, the interpreter elsewhere) or "auto" (pallas on a GPU backend, xla
        elsewhere; ``block_kernel.resolve_block_kernel``).
      activation_rules / param_rules: logical axis -> mesh axes (empty = replicated); logical
        axes not listed are replicated.
    """

    data: int = 1
    fsdp: int = 1
    ring: int = 1
    ulysses: int = 1
    block_size: int = 1
    block_kernel: BlockKernel = "auto"
    activation_rules: dict[str, tuple[str, ...]] = dataclasses.field(
        default_factory=_default_activation_rules
    )
    param_rules: dict[str, tuple[str, ...]] = dataclasses.field(
        default_factory=_default_param_rules
    )

    def __post_init__(self):
        fills = [n for n in ax.MESH_AXES if getattr(self, n) == -1]
        for name in ax.MESH_AXES:
            size = getattr(self, name)
            check(size == -1 or size >= 1, name, f"must be >= 1 or -1 (fill), got {size}")
        check(len(fills) <= 1, fills[-1] if fills else "", f"only one axis may be -1, got {fills}")
        check(self.block_size >= 1, "block_size", f"must be >= 1, got {self.block_size}")
        check(
            self.block_kernel in BLOCK_KERNELS,
            "block_kernel",
            f"must be one of {BLOCK_KERNELS}, got {brief(self.block_kernel)}",
        )
        for table in ("activation_rules", "param_rules"):
            rules = getattr(self, table)
            for logical, mesh_axes in rules.items():
                field = f"{table}.{logical}"
                check(logical in ax.LOGICAL_AXES, field, f"unknown logical axis {logical!r}")
                for m in mesh_axes:
                    check(m in ax.MESH_AXES, field, f"unknown mesh axis {m!r} ({ax.MESH_AXES})")
                check(len(set(mesh_axes)) == len(mesh_axes), field, "repeats a mesh axis")

    def sizes(self, num_devices: int) -> dict[str, int]:
        """Axis sizes with the -1 filled in.

        Raises:
          ConfigError: naming the -1 axis (or ``data*fsdp*ring*ulysses``) when the product does
            not match ``num_devices``.
        """
        fixed = {n: getattr(self, n) for n in ax.MESH_AXES}
        known = math.prod(s for s in fixed.values() if s != -1)
        fill = [n for n, s in fixed.items() if s == -1]
        if fill:
            check(
                num_devices % known == 0,
                fill[0],
                f"-1 cannot fill: {num_devices} devices not divisible by the other axes ({known})"
                + _device_hint(num_devices, known),
            )
            fixed[fill[0]] = num_devices // known
        product = math.prod(fixed.values())
        check(
            product == num_devices,
            "data*fsdp*ring*ulysses",
            f"axis product {product} ({fixed}) != device count {num_devices}"
            + _device_hint(num_devices, product),
        )
        return fixed


def _device_hint(num_devices: int, wanted: int) -> str:
    """How to get ``wanted`` devices: a CPU user most often just forgot to simulate them."""
    return (
        f"; jax sees {num_devices} device(s) here. On CPU set JAX_NUM_CPU_DEVICES={wanted} "
        f"(or XLA_FLAGS=--xla_force_host_platform_device_count={wanted}) before starting"
    )


def load_mesh_config(path: str | Path, overrides: Sequence[str] = ()) -> MeshConfig:
    """Reads and validates a mesh file (structure only; see ``validate_mesh`` for shapes)."""
    return load_config(MeshConfig, path, overrides)


def validate_mesh(
    cfg: MeshConfig,
    num_devices: int,
    *,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    seq_len: int | None = None,
    batch_size: int | None = None,
    devices_per_process: int | None = None,
) -> dict[str, int]:
    """Checks a mesh against the devices and the model/data shapes, before any compilation.

    Ulysses needs U | num_heads; when U does not divide num_kv_heads the KV heads are replicated
    lcm(num_kv_heads, U) / num_kv_heads times (``ulysses.kv_replication``), so that is accepted.

    Args:
      cfg: the mesh config; num_devices: devices the mesh will span.
      num_heads, num_kv_heads: LLM attention heads (checked when given).
      seq_len: packed row length (checked against 2 * ring * ulysses * block_size).
      batch_size: global batch (checked against data * fsdp).
      devices_per_process: local devices per host; ulysses groups must fit inside one.

    Returns:
      The resolved axis sizes.

    Raises:
      ConfigError: naming the offending field.
    """
    sizes = cfg.sizes(num_devices)
    u, r = sizes[ax.ULYSSES], sizes[ax.RING]
    if num_heads is not None:
        check(num_heads >= 1, "num_heads", f"must be >= 1, got {num_heads}")
        check(
            num_heads % u == 0,
            "ulysses",
            f"Ulysses degree {u} must divide the query heads ({num_heads})",
        )
    if num_kv_heads is not None:
        check(
            num_kv_heads >= 1 and (num_heads is None or num_heads % num_kv_heads == 0),
            "num_kv_heads",
            f"{num_kv_heads} KV heads must divide the {num_heads} query heads",
        )
    if seq_len is not None:
        multiple = 2 * r * u * cfg.block_size
        check(
            seq_len % multiple == 0,
            "seq_len",
            f"{seq_len} must be divisible by 2 * ring * ulysses * block_size = {multiple}",
        )
    if batch_size is not None:
        groups = sizes[ax.DATA] * sizes[ax.FSDP]
        check(
            batch_size % groups == 0,
            "batch_size",
            f"{batch_size} not divisible by data*fsdp={groups}",
        )
    if devices_per_process is not None:
        check(
            devices_per_process % u == 0,
            "ulysses",
            f"Ulysses degree {u} must divide the {devices_per_process} devices of one host",
        )
    return sizes


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the (data, fsdp, ring, ulysses) mesh with Auto axis types.

    Devices are ordered by (process, id) and reshaped with ``ulysses`` innermost, so a Ulysses
    group is a run of consecutive devices of one process and ``ring`` steps across processes.

    Raises:
      ConfigError: if the sizes do not fit the devices or a Ulysses group would span hosts.
    """
    ordered = list(jax.devices() if devices is None else devices)
    ordered.sort(key=lambda d: (d.process_index, d.id))
    per_process = len([d for d in ordered if d.process_index == ordered[0].process_index])
    sizes = validate_mesh(cfg, len(ordered), devices_per_process=per_process)
    grid = np.array(ordered, dtype=object).reshape([sizes[n] for n in ax.MESH_AXES])
    return Mesh(grid, ax.MESH_AXES, axis_types=(AxisType.Auto,) * len(ax.MESH_AXES))


def logical_to_spec(logical_axes: Sequence[str | None], rules: Mapping[str, Sequence[str]]) -> P:
    """Maps logical axis names to a PartitionSpec with a rules table.

    Args:
      logical_axes: one logical name (or None = replicated) per array dimension.
      rules: logical name -> mesh axes (``MeshConfig.activation_rules`` or ``param_rules``).

    Raises:
      ValueError: if two dimensions would be sharded over the same mesh axis.
    """
    used: dict[str, str] = {}
    parts = []
    for name in logical_axes:
        mesh_axes = tuple(rules.get(name, ())) if name is not None else ()
        for m in mesh_axes:
            if m in used:
                raise ValueError(
                    f"logical axes {used[m]!r} and {name!r} both map to mesh axis {m!r} "
                    f"in {tuple(logical_axes)}"
                )
            used[m] = name
        parts.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*parts)
