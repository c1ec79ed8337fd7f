"""Mesh files: every shipped YAML parses; validation raises ConfigError naming the field; the
mesh keeps Ulysses groups inside a process; logical-to-mesh rules map to PartitionSpecs."""

from __future__ import annotations

from pathlib import Path

import jax
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from longvila_jax.config.base import ConfigError, from_dict
from longvila_jax.parallel.mesh import (
    MeshConfig,
    load_mesh_config,
    logical_to_spec,
    make_mesh,
    validate_mesh,
)

MESH_DIR = Path(__file__).resolve().parents[2] / "configs" / "mesh"
SHIPPED = {
    "cpu8_r2u4.yaml": (8, dict(ring=2, ulysses=4)),
    "cpu8_u8.yaml": (8, dict(ring=1, ulysses=8)),
    "cpu8_r8.yaml": (8, dict(ring=8, ulysses=1)),
    "gpu8_u8.yaml": (8, dict(ring=1, ulysses=8)),
    "gpu256_r32u8.yaml": (256, dict(ring=32, ulysses=8)),
}


def test_every_shipped_mesh_file_parses_and_resolves():
    assert sorted(p.name for p in MESH_DIR.glob("*.yaml")) == sorted(SHIPPED)
    for name, (devices, want) in SHIPPED.items():
        cfg = load_mesh_config(MESH_DIR / name)
        sizes = validate_mesh(cfg, devices, num_heads=32, num_kv_heads=8, batch_size=4)
        for axis, size in want.items():
            assert sizes[axis] == size, (name, sizes)


@pytest.mark.parametrize("name", ["cpu8_r2u4.yaml", "cpu8_u8.yaml", "cpu8_r8.yaml"])
def test_cpu_meshes_build_on_eight_devices(name):
    mesh = make_mesh(load_mesh_config(MESH_DIR / name))
    assert mesh.axis_names == ("data", "fsdp", "ring", "ulysses")
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    # Shard r*U + u of P(('ring', 'ulysses')) sits on device (r, u): ulysses is innermost.
    devs = mesh.devices.reshape(-1)
    assert [d.id for d in devs] == sorted(d.id for d in jax.devices())


@pytest.mark.parametrize(
    "data,field",
    [
        (dict(ring=-1, ulysses=-1), "ulysses"),
        (dict(ring=0), "ring"),
        (dict(block_size=0), "block_size"),
        (dict(activation_rules={"sequence": ["ring"]}), "activation_rules.sequence"),
        (dict(activation_rules={"seq": ["rng"]}), "activation_rules.seq"),
        (dict(param_rules={"embed": ["fsdp", "fsdp"]}), "param_rules.embed"),
        (dict(ulysess=2), "ulysess"),
        (dict(ring="two"), "ring"),
    ],
)
def test_bad_mesh_files_name_the_field(data, field):
    with pytest.raises(ConfigError) as e:
        from_dict(MeshConfig, data)
    assert e.value.field == field


@pytest.mark.parametrize(
    "cfg,kwargs,field",
    [
        (dict(ring=2, ulysses=2), dict(num_devices=8), "data*fsdp*ring*ulysses"),
        (dict(ring=-1, ulysses=3), dict(num_devices=8), "ring"),
        (dict(ulysses=8), dict(num_devices=8, num_heads=28), "ulysses"),
        (dict(ulysses=4), dict(num_devices=4, num_heads=8, num_kv_heads=3), "num_kv_heads"),
        (dict(ring=2, ulysses=4, block_size=4), dict(num_devices=8, seq_len=96), "seq_len"),
        (dict(data=2, ring=4), dict(num_devices=8, batch_size=3), "batch_size"),
        (dict(ulysses=8), dict(num_devices=8, devices_per_process=4), "ulysses"),
    ],
)
def test_validation_names_the_field(cfg, kwargs, field):
    with pytest.raises(ConfigError) as e:
        validate_mesh(MeshConfig(**cfg), **kwargs)
    assert e.value.field == field


def test_validation_accepts_kv_replication_and_fill():
    # Qwen2-7B: 28 query / 4 KV heads; U = 7 or 14 replicate KV, 28 / 2 = 14 devices.
    sizes = validate_mesh(MeshConfig(ulysses=14, data=-1), 28, num_heads=28, num_kv_heads=4)
    assert sizes == {"data": 2, "fsdp": 1, "ring": 1, "ulysses": 14}
    validate_mesh(MeshConfig(ring=2, ulysses=4, block_size=4), 8, seq_len=64, batch_size=1)


def test_make_mesh_rejects_wrong_device_count():
    with pytest.raises(ConfigError) as e:
        make_mesh(MeshConfig(ring=2, ulysses=2), jax.devices()[:8])
    assert e.value.field == "data*fsdp*ring*ulysses"


def test_logical_to_spec():
    cfg = MeshConfig()
    assert logical_to_spec(("batch", "seq", None), cfg.activation_rules) == P(
        ("data", "fsdp"), ("ring", "ulysses"), None
    )
    assert logical_to_spec(("embed", "mlp"), cfg.param_rules) == P("fsdp", None)
    with pytest.raises(ValueError, match="'batch' and 'embed'"):
        logical_to_spec(("batch", "embed"), {"batch": ("data", "fsdp"), "embed": ("fsdp",)})
