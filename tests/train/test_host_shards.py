"""Data shards (``parallel.host_shards``): which processes read the same rows, and that the
blocks each process supplies assemble the single-process global arrays exactly.

Multi-process layouts are simulated in one process: a hypothetical process owns a run of
consecutive mesh devices (``make_mesh`` orders devices by (process, id)). For every simulated
process, the MM-SP host arrays built from *its shard's rows only* must give every one of its
devices the same (row, sequence) block as ``host_arrays`` of the whole global batch on one
process, for a mesh whose sequence-parallel groups span processes (ring 2 x ulysses 4 on 2 x 4
devices) and a mixed one (data 2 x ring 2 x ulysses 2 on 4 x 2 devices: two processes per
group, two groups). The real 2-process run is ``test_multihost_mmsp.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers.harness import video_stage_dict

from longvila_jax.config.base import ConfigError, from_dict
from longvila_jax.config.train import StageConfig
from longvila_jax.core.axes import MESH_AXES
from longvila_jax.data.pipeline import DataIterator
from longvila_jax.parallel.host_shards import (
    DataShard,
    count_data_shards,
    data_shard,
    shard_of_processes,
)
from longvila_jax.parallel.mesh import MeshConfig, make_mesh
from longvila_jax.parallel.mmsp import MMSPPlan
from longvila_jax.train.objective import image_token_id_of
from longvila_jax.train.resolve import resolve_stage

BATCH = ("data", "fsdp")


def _grid(sizes: dict[str, int], per_process: int) -> np.ndarray:
    shape = [sizes.get(a, 1) for a in MESH_AXES]
    return (np.arange(int(np.prod(shape))) // per_process).reshape(shape)


@pytest.mark.parametrize(
    "sizes,per_process,want",
    [
        ({"ring": 2, "ulysses": 4}, 4, ([0, 0], 1)),  # one SP group over both processes
        ({"data": 2, "ulysses": 4}, 4, ([0, 1], 2)),  # one group per process
        ({"data": 2, "ring": 2, "ulysses": 2}, 2, ([0, 0, 1, 1], 2)),  # 2 processes per group
        ({"data": 4, "ulysses": 2}, 4, ([0, 1], 2)),  # 2 groups per process
        ({"fsdp": 8}, 1, (list(range(8)), 8)),
    ],
)
def test_shards_follow_batch_groups(sizes, per_process, want):
    assert shard_of_processes(_grid(sizes, per_process), MESH_AXES, BATCH) == want
    full = {a: sizes.get(a, 1) for a in MESH_AXES}
    assert count_data_shards(full, MESH_AXES, BATCH, len(want[0])) == want[1]


def test_shards_reject_processes_straddling_groups():
    # 3 processes x 4 devices, SP groups of 6: process 1 holds half of group 0 and of group 1.
    with pytest.raises(ValueError, match="overlap across processes"):
        shard_of_processes(_grid({"data": 2, "ring": 3, "ulysses": 2}, 4), MESH_AXES, BATCH)


def test_single_process_is_one_shard():
    mesh = make_mesh(MeshConfig(data=2, ring=2, ulysses=2))
    assert data_shard(mesh, BATCH) == DataShard(0, 1)


def _stage(corpus, tmp_path, mesh_sets, **overrides) -> StageConfig:
    data = video_stage_dict(
        corpus,
        tmp_path / "run",
        {"max_frames_per_row": 12, "batch_size": 4},
        trainable=[".*"],
        steps=1,
        optim={"lr": 1.0e-3, "grad_accum": 2},
        objective="mmsp",
        mesh_set=mesh_sets,
        **overrides,
    )
    return from_dict(StageConfig, data)


@pytest.mark.parametrize("mesh_sets,per_process", [([], 4), (["data=2", "ring=2", "ulysses=2"], 2)])
def test_process_blocks_assemble_the_global_arrays(corpus, tmp_path, mesh_sets, per_process):
    stage = _stage(corpus, tmp_path, mesh_sets)
    n_proc = 8 // per_process
    multi = resolve_stage(
        stage, num_devices=8, process_count=n_proc, devices_per_process=per_process
    )
    shards, count = shard_of_processes(_grid(multi.mesh_sizes, per_process), MESH_AXES, BATCH)
    assert multi.data_shards == count and multi.global_batch == 4 * count
    one = resolve_stage(stage, num_devices=8)
    mesh = make_mesh(one.mesh)

    def plan(shard):
        return MMSPPlan(
            mesh,
            seq_len=256,
            frame_slots=12,
            tokens_per_frame=4,
            image_token_id=image_token_id_of(one),
            batch_axes=BATCH,
            grad_accum=2,
            shard=shard,
        )

    # The rows shard s reads, and the global batch of one process: per micro-batch, the
    # shards' rows in shard order (the order of the batch groups).
    local_batches = []
    for s in range(count):
        it = DataIterator(one.data, s, count)
        local_batches.append(next(it))
        it.close()
    glob = {
        k: np.concatenate([b[k][m * 2 : (m + 1) * 2] for m in range(2) for b in local_batches])
        for k in local_batches[0]
    }
    want = plan(DataShard(0, 1)).host_arrays(glob)
    sh = plan(DataShard(0, 1)).shardings()
    assert int((want["recv"] >= 0).sum()) > 0  # frames are routed
    flat = list(mesh.devices.flat)
    for s in range(count):
        shard = DataShard(s, count)
        local = plan(shard).host_arrays(local_batches[s])
        for key, arr in want.items():
            index_of = sh[key].devices_indices_map(arr.shape)
            for p in (p for p in range(n_proc) if shards[p] == s):
                for dev in flat[p * per_process : (p + 1) * per_process]:
                    idx = index_of[dev]
                    np.testing.assert_array_equal(
                        shard.block(local[key], idx), arr[idx], err_msg=f"{key} shard {s} {dev}"
                    )
        other = [p for p in range(n_proc) if shards[p] != s]
        if other:  # a device of another shard is refused, not silently filled
            idx = sh["labels"].devices_indices_map(want["labels"].shape)[
                flat[other[0] * per_process]
            ]
            with pytest.raises(RuntimeError, match="needs rows"):
                shard.block(local["labels"], idx)


def test_resolve_rejects_processes_straddling_groups(corpus, tmp_path):
    # 3 processes x 4 devices, SP groups of 6 devices: process 1 holds parts of both groups.
    stage = _stage(corpus, tmp_path, ["data=2", "ring=3", "ulysses=2"], seq_len=384)
    with pytest.raises(ConfigError, match="activation_rules.batch"):
        resolve_stage(stage, num_devices=12, process_count=3, devices_per_process=4)
