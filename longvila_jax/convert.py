"""Checkpoint converter CLI: VILA/LongVILA or plain HF parts <-> project checkpoints.

    python -m longvila_jax.convert import --vila DIR --out CKPT [--set k=v ...]
    python -m longvila_jax.convert import --llm DIR --vision DIR --projector-type T --out CKPT
    python -m longvila_jax.convert export --ckpt CKPT --out DIR
    python -m longvila_jax.convert seal --ckpt CKPT [--force]

Only safetensors and JSON are read (never pickle, never remote code), and every input is
treated as hostile: a malformed, inconsistent, tampered or unsafe file ends the command with
``error: ...`` naming the file and field or tensor, exit code 1, and no output left behind.
NaN/Inf weights are refused unless ``--allow-nonfinite``. ``seal`` writes the integrity
manifest of a project checkpoint written before manifests existed (after checking its
structure); every other reader refuses a project checkpoint without a valid manifest.
Prints the elapsed time and the peak resident memory of the process when done.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

from longvila_jax.core.errors import InputError


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
    imp.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="accept NaN/Inf weights (with a warning) instead of refusing them",
    )
    imp.add_argument(
        "--keep-vocab",
        action="store_true",
        help="(--llm) keep the tokenizer and embedding table as they are; by default a tokenizer "
        "without BOS / pad gets [BOS] / [PAD] and the table is resized, as VILA's stage 1 does",
    )
    exp = sub.add_parser("export", help="project checkpoint -> VILA layout")
    exp.add_argument("--ckpt", required=True, help="project checkpoint directory")
    exp.add_argument("--out", required=True, help="new VILA-layout directory")
    seal = sub.add_parser(
        "seal", help="check a trusted project checkpoint and write its integrity manifest"
    )
    seal.add_argument("--ckpt", required=True, help="project checkpoint directory")
    seal.add_argument("--force", action="store_true", help="replace an existing manifest")
    return p


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit code (0 ok, 1 refused input or I/O error, 2 usage)."""
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (InputError, OSError) as e:  # FileExistsError is an OSError
        print(f"error: {_bounded(e)}", file=sys.stderr)
        return 1


def _bounded(e: BaseException) -> str:
    """The message of ``e``, bounded (an I/O error from a hostile path could be huge)."""
    text = str(e)
    return text if len(text) <= 2000 else text[:1997] + "..."


def _run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    # Each command imports only its own converter: jax and the model stack load slowly, and a
    # usage error or --help should not wait for them.
    if args.cmd == "import":
        from longvila_jax.ckpt.hf_parts_import import import_hf_parts
        from longvila_jax.ckpt.vila_import import import_vila

        if args.vila and not (args.llm or args.vision or args.projector_type):
            cfg = import_vila(
                args.vila,
                args.out,
                overrides=args.set,
                progress=True,
                allow_nonfinite=args.allow_nonfinite,
            )
        elif args.llm and args.vision and args.projector_type and not args.vila:
            cfg = import_hf_parts(
                args.llm,
                args.vision,
                args.out,
                projector_type=args.projector_type,
                overrides=args.set,
                seed=args.seed,
                progress=True,
                allow_nonfinite=args.allow_nonfinite,
                stage1_tokens=not args.keep_vocab,
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
    elif args.cmd == "export":
        from longvila_jax.ckpt.vila_export import export_vila

        export_vila(args.ckpt, args.out)
        print(f"wrote {args.out}")
    else:
        from longvila_jax.ckpt.integrity import seal_checkpoint

        seal_checkpoint(args.ckpt, force=args.force)
        print(f"sealed {args.ckpt}: wrote its integrity manifest")
    # ru_maxrss is in KiB on Linux.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"elapsed {time.perf_counter() - start:.1f} s, peak RSS {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
