"""Checkpoint converter CLI: VILA/LongVILA or plain HF parts <-> project checkpoints.

    python -m longvila_jax.convert import --vila DIR --out CKPT [--set k=v ...]
    python -m longvila_jax.convert import --llm DIR --vision DIR --projector-type T --out CKPT
    python -m longvila_jax.convert export --ckpt CKPT --out DIR

Only safetensors and JSON are read (never pickle, never remote code). Prints the elapsed time
and the peak resident memory of the process when done.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m longvila_jax.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="VILA layout or HF LLM + SigLIP -> project checkpoint")
    imp.add_argument("--vila", help="VILA-layout directory (config.json, llm/, vision_tower/, ...)")
    imp.add_argument("--llm", help="plain HF Llama/Qwen2 directory (with tokenizer)")
    imp.add_argument("--vision", help="plain HF SigLIP directory")
    imp.add_argument("--projector-type", help="type of the new projector (with --llm/--vision)")
    imp.add_argument("--seed", type=int, default=0, help="init seed of the new projector")
    imp.add_argument("--out", required=True, help="new project checkpoint directory")
    imp.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="K=V",
        help="ModelConfig override, e.g. projector.token_order=col_major",
    )
    exp = sub.add_parser("export", help="project checkpoint -> VILA layout")
    exp.add_argument("--ckpt", required=True, help="project checkpoint directory")
    exp.add_argument("--out", required=True, help="new VILA-layout directory")
    return p


def main(argv: list[str] | None = None) -> int:
    from longvila_jax.ckpt.safetensors_io import CheckpointError
    from longvila_jax.config.base import ConfigError

    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (CheckpointError, ConfigError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.cmd == "import":
        from longvila_jax.ckpt.hf_parts_import import import_hf_parts
        from longvila_jax.ckpt.vila_import import import_vila

        if args.vila and not (args.llm or args.vision or args.projector_type):
            cfg = import_vila(args.vila, args.out, overrides=args.set, progress=True)
        elif args.llm and args.vision and args.projector_type and not args.vila:
            cfg = import_hf_parts(
                args.llm,
                args.vision,
                args.out,
                projector_type=args.projector_type,
                overrides=args.set,
                seed=args.seed,
                progress=True,
            )
        else:
            print(
                "import needs --vila DIR, or --llm DIR --vision DIR --projector-type T",
                file=sys.stderr,
            )
            return 2
        print(
            f"wrote {args.out}: {cfg.llm.arch} LLM, {cfg.projector.type} projector "
            f"({cfg.projector.token_order}), image_token_id {cfg.image_token_id}"
        )
    else:
        from longvila_jax.ckpt.vila_export import export_vila

        export_vila(args.ckpt, args.out)
        print(f"wrote {args.out}")
    # ru_maxrss is in KiB on Linux.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"elapsed {time.perf_counter() - start:.1f} s, peak RSS {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
