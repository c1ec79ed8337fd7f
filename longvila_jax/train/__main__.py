"""CLI: ``python -m longvila_jax.train --config STAGE.yaml [--mesh MESH.yaml] [--set k=v ...]``.

Runs or resumes one stage (rerunning the same command after a kill or preemption continues from
the newest committed checkpoint). Exit codes: 0 done, 1 failed, 2 bad config (nothing compiled),
3 halted on non-finite values, 75 preempted by SIGTERM (current step committed).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m longvila_jax.train", description=__doc__)
    p.add_argument("--config", required=True, help="stage YAML (configs/stages/*.yaml)")
    p.add_argument("--mesh", default=None, help="mesh YAML (default: the stage's mesh)")
    p.add_argument("--set", action="append", default=[], metavar="K=V", help="dotted override")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)

    from longvila_jax.config.base import ConfigError
    from longvila_jax.config.train import load_stage
    from longvila_jax.train.loop import EXIT_CONFIG, run_stage

    try:
        stage = load_stage(args.config, args.set)
        return run_stage(stage, mesh_path=args.mesh, progress=not args.no_progress)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
