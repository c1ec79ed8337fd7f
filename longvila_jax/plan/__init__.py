"""The mesh planner: every (data, fsdp, ring, ulysses) mesh for a cluster, ranked by predicted
step time, with memory per device by component and the reasons invalid meshes fail.

Modules: ``hardware`` (cluster presets, efficiencies), ``workload`` (what is trained, from a
stage or flags), ``flops``, ``comm`` (the analytic collective volumes, also used by
``bench/comm_bytes.py``), ``memory``, ``search`` (enumeration and prediction), ``report``
(table, JSON, mesh YAML), ``witness`` (the real step compiled for abstract inputs, to check the
memory model), ``auto`` (the trainer's ``--mesh auto``). CLI: ``python -m longvila_jax.plan``.
It sits above ``train/`` (it reuses the dry run's parameter bytes and the real step); the
trainer's CLI imports it.
"""

from __future__ import annotations

from typing import Any


def plan_from_args(args: Any):
    """(workload, cluster, ranked predictions) from the CLI's parsed arguments.

    Raises:
      ConfigError: a bad stage, model, preset or figure.
    """
    import dataclasses

    from longvila_jax.config.base import check, load_config
    from longvila_jax.config.model import ModelConfig
    from longvila_jax.config.train import load_stage
    from longvila_jax.plan.hardware import make_cluster
    from longvila_jax.plan.search import enumerate_plans
    from longvila_jax.plan.workload import Workload

    if args.stage:
        stage = load_stage(args.stage, args.set)
        work = Workload.from_stage(stage, global_rows=args.rows)
        changes = {}
        if args.seq_len:
            changes["seq_len"] = args.seq_len
        if args.frames is not None:
            changes["frames"] = args.frames
        work = dataclasses.replace(work, **changes) if changes else work
    else:
        check(bool(args.seq_len), "seq_len", "--seq-len is required with --model")
        model = load_config(ModelConfig, args.model)
        work = Workload.custom(
            model, seq_len=args.seq_len, frames=args.frames or 0, global_rows=args.rows
        )
    cluster = make_cluster(
        args.preset,
        nodes=args.nodes,
        devices_per_node=args.devices_per_node,
        hbm_gib=args.hbm_gib,
        usable=args.usable,
        nvlink_gbps=args.nvlink_gbps,
        ib_gbps=args.ib_gbps,
        peak_tflops=args.peak_tflops,
        matmul_eff=args.matmul_eff,
        attention_eff=args.attention_eff,
    )
    return work, cluster, enumerate_plans(work, cluster, block_size=args.block_size)


__all__ = ["plan_from_args"]
