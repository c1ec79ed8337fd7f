"""``--mesh auto``: the trainer asks the planner for a mesh on the devices it sees.

The stage fixes everything but the mesh: its remat policy, its grad_accum (so the rows per
micro-batch follow from the batch) and its block size (from the stage's own mesh file). The
planner ranks the meshes of ``jax.device_count()`` devices in hosts of
``jax.local_device_count()`` and the best valid one is written as a mesh YAML the run then
loads like any other (``--mesh FILE``).

The cluster figures: on a GPU backend the preset whose name matches the device kind (H200, else
H100 SXM) with the memory the device reports (``memory_stats()["bytes_limit"]``); on CPU the
same bandwidths with an unconstrained memory budget (host RAM is not what is being planned).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import jax

from longvila_jax.config.train import StageConfig
from longvila_jax.parallel.mesh import load_mesh_config
from longvila_jax.plan.hardware import GIB, make_cluster
from longvila_jax.plan.report import write_mesh
from longvila_jax.plan.search import Candidate, best, enumerate_plans, predict
from longvila_jax.plan.workload import Workload

CPU_HBM_GIB = 1024.0


def local_cluster(devices: list | None = None):
    """The planner's ``Cluster`` for the devices of this run (module docstring)."""
    devices = list(jax.devices() if devices is None else devices)
    per_node = max(1, len([d for d in devices if d.process_index == devices[0].process_index]))
    nodes = max(1, len(devices) // per_node)
    kind = str(getattr(devices[0], "device_kind", "")).lower()
    preset = "h200-sxm" if "h200" in kind else "h100-sxm"
    hbm = None
    if devices[0].platform == "gpu":
        stats = devices[0].memory_stats() or {}
        if stats.get("bytes_limit"):
            hbm = stats["bytes_limit"] / GIB
    else:
        hbm = CPU_HBM_GIB
    return make_cluster(preset, nodes=nodes, devices_per_node=per_node, hbm_gib=hbm, usable=1.0)


def planned_cluster(devices: int, devices_per_host: int):
    """The cluster of a dry run: ``devices`` GPUs (H100 SXM figures) in hosts of
    ``devices_per_host``."""
    per = min(devices_per_host, devices)
    return make_cluster("h100-sxm", nodes=max(1, devices // per), devices_per_node=per)


def auto_mesh(stage: StageConfig, cluster=None, out: str | Path | None = None):
    """Plans the mesh of ``stage`` on ``cluster`` (default: this run's devices) and writes it.

    Args:
      stage: the stage (its remat, grad_accum, batch and block size are kept).
      cluster: a ``plan.hardware.Cluster`` (default :func:`local_cluster`).
      out: where to write the mesh (default: a fresh file in the temp directory).

    Returns:
      (path of the mesh YAML, the chosen ``Prediction``).

    Raises:
      ConfigError: no mesh is valid for the stage on these devices.
    """
    gpu = cluster is not None or jax.devices()[0].platform == "gpu"
    cluster = cluster or local_cluster()
    work = Workload.from_stage(stage)
    block = load_mesh_config(stage.mesh, stage.mesh_set).block_size
    predictions = enumerate_plans(
        work,
        cluster,
        remats=(work.model.remat,),
        block_size=block,
        grad_accum=stage.optim.grad_accum,
        block_kernel="pallas" if gpu else "xla",
    )
    choice = best(predictions)
    if out is None:
        handle, name = tempfile.mkstemp(prefix=f"mesh_auto_{stage.name}_", suffix=".yaml")
        os.close(handle)
        out = name
    return write_mesh(out, choice, work, cluster), choice


def predict_mesh(stage: StageConfig, sizes: dict[str, int], param_rules: dict, cluster) -> Any:
    """The planner's prediction for the mesh a dry run resolved (``sizes``, ``param_rules``)
    on ``cluster``: the stage's remat, grad_accum and batch."""
    work = Workload.from_stage(stage)
    groups = sizes["data"] * sizes["fsdp"]
    accum = stage.optim.grad_accum
    micro = max(1, (work.global_rows or groups) // (groups * accum))
    zero = "ring" in tuple(param_rules.get("embed", ()))
    c = Candidate(
        sizes["data"], sizes["fsdp"], sizes["ring"], sizes["ulysses"], work.model.remat, micro,
        zero_sp=zero,
    )  # fmt: skip
    return predict(work, cluster, c, "pallas", accum)


def summary(choice: Any) -> str:
    """One line naming the chosen mesh and its predictions."""
    c = choice.candidate
    zero = ", params over fsdp x ring x ulysses" if c.zero_sp else ""
    return (
        f"mesh auto: data={c.data} fsdp={c.fsdp} ring={c.ring} ulysses={c.ulysses}{zero}; "
        f"predicted {choice.memory['total'] / GIB:.2f} GiB per device, "
        f"{choice.time.get('step', 0):.3g} s per step"
    )


__all__ = ["auto_mesh", "local_cluster", "planned_cluster", "predict_mesh", "summary"]
