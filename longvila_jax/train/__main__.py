"""CLI: ``python -m longvila_jax.train --config STAGE.yaml [--mesh MESH.yaml] [--set k=v ...]``
``[--dry-run [--devices N] [--devices-per-host N]]``.

Runs or resumes one stage (rerunning the same command after a kill or preemption continues from
the newest committed checkpoint). Exit codes: 0 done; 1 failed, with one ``error: ...`` line for
a bad input (a tampered init checkpoint, no intact checkpoint to resume, a changed dataset, a
broken data set or, under ``--fail-fast``, the first bad sample); 2 bad config, with one
``config error: ...`` line naming the file or field (nothing compiled); 3 halted on non-finite
values; 75 preempted by SIGTERM (current step committed).

``--dry-run`` plans the stage instead of running it (``train.dry_run``): every config check a run
makes, against the planned device count (the mesh's sizes with ``mesh_set``, or ``--devices N``
when an axis is -1; ``--devices-per-host``, default 8, sets the process count), the model built
abstractly, nothing read from the data, the tokenizer or a checkpoint, nothing compiled or put on
a device. It prints one JSON object on stdout (samples, tokens and rows per step, lr, steps,
parameter counts, the longest admitted sample against ``seq_len``, dtypes, per-device parameter
and optimizer bytes) and the same as a table on stderr. Exit codes: 0 the plan fits; 1 the
longest sample the data config admits exceeds ``seq_len`` (the JSON still printed, ``"fits":
false``, and one ``error:`` line); 2 bad config.

``--mesh auto`` asks the planner (``longvila_jax.plan``) for the fastest mesh that fits on the
devices present (dry run: ``--devices`` in hosts of ``--devices-per-host``), keeping the stage's
remat, grad_accum and batch; the stage's ``mesh_set`` is dropped. The chosen mesh is written as
a YAML file (its path printed on stderr). The dry run also prints the planner's predicted memory
per device and step time for its mesh on H100 SXM nodes (``planner``).

``--fail-fast`` turns every bad sample into an error naming it (``DataConfig.fail_fast``) for
debugging a data set; it is not part of the resume fingerprint, so a run may be resumed with or
without it.
"""

from __future__ import annotations

import argparse
import sys

from longvila_jax.core.errors import ConfigError, InputError


def main(argv: list[str] | None = None) -> int:
    """Runs the trainer CLI; returns the exit code (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m longvila_jax.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="stage YAML (configs/stages/*.yaml)")
    parser.add_argument(
        "--mesh",
        default=None,
        help="mesh YAML (default: the stage's mesh), or 'auto': the planner picks one for the "
        "devices present (dry run: --devices) and writes it as YAML (longvila_jax.plan)",
    )
    parser.add_argument("--set", action="append", default=[], metavar="K=V", help="dotted override")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--fail-fast",
        action="store_true",
        help="stop at the first bad sample with an error naming it (debugging)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the stage's plan as JSON (stdout) and a table (stderr); run nothing",
    )
    parser.add_argument(
        "--devices",
        type=int,
        default=None,
        help="dry run: planned device count (default: the product of the mesh sizes)",
    )
    parser.add_argument(
        "--devices-per-host",
        type=int,
        default=8,
        help="dry run: devices per process (default 8: one GPU node)",
    )
    args = parser.parse_args(argv)
    # Before anything initialises the JAX backend: on GPU, let the ring's collectives overlap
    # the block compute (train.xla_flags; nothing changes on CPU or for flags already set).
    from longvila_jax.train.xla_flags import apply_gpu_flags

    apply_gpu_flags()
    if args.dry_run:
        return _dry_run(args)

    # Imported here: jax and the model stack load slowly, and --help should not wait for them.
    from longvila_jax.config.train import load_stage
    from longvila_jax.train import loop

    try:
        stage = load_stage(args.config, args.set)
        if args.mesh == "auto":
            stage, args.mesh = _auto_mesh(stage)
        return loop.run_stage(
            stage, mesh_path=args.mesh, progress=not args.no_progress, fail_fast=args.fail_fast
        )
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return loop.EXIT_CONFIG
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return loop.EXIT_FAILED


def _dry_run(args: argparse.Namespace) -> int:
    """``--dry-run``: the plan as JSON on stdout and a table on stderr (exit codes above)."""
    import json

    from longvila_jax.config.train import load_stage
    from longvila_jax.train import dry_run

    try:
        stage = load_stage(args.config, args.set)
        if args.mesh == "auto":
            stage, args.mesh = _auto_mesh(stage, args.devices, args.devices_per_host)
        report = dry_run.plan(
            stage,
            mesh_path=args.mesh,
            devices=args.devices,
            devices_per_host=args.devices_per_host,
        )
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    report["planner"] = _planner_report(stage, args, report)
    print(dry_run.table(report), file=sys.stderr)
    print(json.dumps(report))
    if not report["fits"]:
        print(
            f"error: {stage.name}: the longest admitted sample has "
            f"{report['max_sample_positions']} positions > seq_len {report['seq_len']}",
            file=sys.stderr,
        )
        return 1
    return 0


def _auto_mesh(stage, devices: int | None = None, devices_per_host: int = 8):
    """``--mesh auto``: the planner's mesh for this run's devices (or, in a dry run, for
    ``--devices`` in hosts of ``--devices-per-host``), written as YAML. Returns the stage
    without its ``mesh_set`` (it would override the planner's sizes) and the YAML's path."""
    import dataclasses

    from longvila_jax.plan import auto

    stage = dataclasses.replace(stage, mesh_set=())
    cluster = None
    if devices is not None:
        cluster = auto.planned_cluster(devices, devices_per_host)
    path, choice = auto.auto_mesh(stage, cluster)
    print(f"{auto.summary(choice)} ({path})", file=sys.stderr)
    return stage, str(path)


def _planner_report(stage, args: argparse.Namespace, report: dict) -> dict | None:
    """The planner's predicted memory (GiB per device) and step time (s) for the dry run's mesh
    on H100 SXM nodes of ``--devices-per-host`` GPUs; None when it cannot predict."""
    from longvila_jax.parallel.mesh import load_mesh_config
    from longvila_jax.plan import auto

    try:
        rules = load_mesh_config(args.mesh or stage.mesh, stage.mesh_set).param_rules
        cluster = auto.planned_cluster(report["devices"], args.devices_per_host)
        p = auto.predict_mesh(stage, report["mesh"], rules, cluster)
    except (ConfigError, ValueError) as e:
        print(f"planner: no prediction ({e})", file=sys.stderr)
        return None
    return {
        "cluster": f"{cluster.nodes} x {cluster.devices_per_node} H100 SXM (80 GiB)",
        "memory_gib": round(p.memory["total"] / 2**30, 2),
        "fits": p.memory["total"] <= cluster.budget_bytes,
        "step_s": round(p.time.get("step", 0.0), 3),
        "compute_s": round(p.time.get("compute", 0.0), 3),
        "comm_exposed_s": round(p.time.get("comm_exposed", 0.0), 3),
        "tokens_per_s": round(p.tokens_per_s),
    }


if __name__ == "__main__":
    sys.exit(main())
