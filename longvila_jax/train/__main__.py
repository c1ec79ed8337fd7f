"""CLI: ``python -m longvila_jax.train --config STAGE.yaml [--mesh MESH.yaml] [--set k=v ...]``.

Runs or resumes one stage (rerunning the same command after a kill or preemption continues from
the newest committed checkpoint). Exit codes: 0 done; 1 failed, with one ``error: ...`` line for
a bad input (a tampered init checkpoint, no intact checkpoint to resume, a changed dataset, a
broken data set or, under ``--fail-fast``, the first bad sample); 2 bad config, with one
``config error: ...`` line naming the file or field (nothing compiled); 3 halted on non-finite
values; 75 preempted by SIGTERM (current step committed).

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
    parser.add_argument("--mesh", default=None, help="mesh YAML (default: the stage's mesh)")
    parser.add_argument("--set", action="append", default=[], metavar="K=V", help="dotted override")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--fail-fast",
        action="store_true",
        help="stop at the first bad sample with an error naming it (debugging)",
    )
    args = parser.parse_args(argv)

    # Imported here: jax and the model stack load slowly, and --help should not wait for them.
    from longvila_jax.config.train import load_stage
    from longvila_jax.train import loop

    try:
        stage = load_stage(args.config, args.set)
        return loop.run_stage(
            stage, mesh_path=args.mesh, progress=not args.no_progress, fail_fast=args.fail_fast
        )
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return loop.EXIT_CONFIG
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return loop.EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
