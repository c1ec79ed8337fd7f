"""CLI: ``python -m longvila_jax.plan (--stage STAGE.yaml | --model MODEL.yaml --seq-len L
[--frames F] [--rows B]) --nodes N [--devices-per-node 8] [--preset h100-sxm|h200-sxm]
[--hbm-gib G] [--nvlink-gbps B] [--ib-gbps B] [--peak-tflops T] [--out configs/mesh/NAME.yaml]
[--json] [--all]``.

Enumerates every (data, fsdp, ring, ulysses) factorisation of nodes x devices-per-node with the
remat policies and micro-batches (``plan.search``), and prints the ranked table: predicted
memory per device by component, step time split into compute and communication, tokens/s;
invalid choices follow with their reasons. ``--out`` writes the best valid choice as a mesh
YAML (``parallel.mesh.load_mesh_config`` reads it; set the stage's ``remat`` to the table's).
``--json`` prints every candidate as JSON instead. Exit codes: 0 a valid mesh exists; 1 none
does (the table still printed); 2 bad config.
"""

from __future__ import annotations

import argparse
import sys

from longvila_jax.core.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m longvila_jax.plan",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--stage", help="stage YAML (seq_len, frames, batch, precision, model)")
    src.add_argument("--model", help="model YAML (configs/model/*.yaml), with --seq-len")
    p.add_argument("--set", action="append", default=[], metavar="K=V", help="stage override")
    p.add_argument("--seq-len", type=int, help="tokens per row (overrides the stage's)")
    p.add_argument("--frames", type=int, help="frame slots per row (default 0 or the stage's)")
    p.add_argument("--rows", type=int, help="rows per optimizer step (default: the stage's)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--devices-per-node", type=int, default=8)
    p.add_argument("--preset", default="h100-sxm", help="h100-sxm or h200-sxm")
    p.add_argument("--hbm-gib", type=float, help="memory per device, GiB")
    p.add_argument("--usable", type=float, help="fraction of memory the step may use (0.9)")
    p.add_argument("--nvlink-gbps", type=float, help="NVLink GB/s per GPU per direction")
    p.add_argument("--ib-gbps", type=float, help="InfiniBand GB/s per GPU per direction")
    p.add_argument("--peak-tflops", type=float, help="bf16 dense peak TFLOP/s")
    p.add_argument("--matmul-eff", type=float, help="achieved fraction of peak for GEMMs")
    p.add_argument("--attention-eff", type=float, help="achieved fraction for attention")
    p.add_argument("--block-size", type=int, default=1, help="mesh block_size (GPU: 128)")
    p.add_argument("--out", help="write the best mesh here (configs/mesh/NAME.yaml)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--all", action="store_true", help="list every candidate in the table")
    return p


def main(argv: list[str] | None = None) -> int:
    """Runs the planner CLI; returns the exit code (module docstring)."""
    args = _parser().parse_args(argv)
    import json

    from longvila_jax.plan import plan_from_args
    from longvila_jax.plan.report import table, to_json, write_mesh
    from longvila_jax.plan.search import best

    try:
        work, cluster, predictions = plan_from_args(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    valid = [p for p in predictions if p.valid]
    if args.json:
        print(json.dumps(to_json(predictions, work, cluster)))
    else:
        limit = None if args.all else 20
        print(table(predictions, limit=limit, invalid=None if args.all else 20))
    if not valid:
        print("error: no valid mesh for this workload and cluster", file=sys.stderr)
        return 1
    if args.out:
        path = write_mesh(args.out, best(predictions), work, cluster)
        print(f"wrote {path} (stage remat: {valid[0].candidate.remat})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
