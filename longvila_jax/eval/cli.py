"""Command lines of the evaluations (``python -m longvila_jax.eval.vniah`` / ``.videomme``).

Shared pieces: number lists (``8,16,32`` or ``start:stop:step``, stop included), loading the
model and tokenizer (``ckpt.load_pretrained``; the tokenizer from the checkpoint or
``--tokenizer``), the optional mesh file, and ``--cpu-devices`` to simulate devices on a CPU
host (set before the jax backend starts). Errors in the inputs (any ``core.errors.InputError``:
a missing, garbage or tampered model directory, a bad mesh file, malformed annotations) exit
with status 2 and a one-line ``error: ...`` message naming the problem, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from longvila_jax.core.errors import InputError


def parse_numbers(text: str, kind: Callable = int) -> list:
    """``"8,16,32"`` or ``"300:6000:300"`` (inclusive) -> list of ``kind``."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if ":" in part:
            start, stop, step = (kind(x) for x in part.split(":"))
            if step <= 0:
                raise argparse.ArgumentTypeError(f"step must be positive in {part!r}")
            n = int(round((stop - start) / step)) + 1
            out += [kind(round(start + i * step, 10)) for i in range(max(n, 0))]
        else:
            out.append(kind(part))
    if not out:
        raise argparse.ArgumentTypeError(f"no numbers in {text!r}")
    return out


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="project checkpoint or VILA-layout folder")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model's)")
    p.add_argument("--mesh", help="mesh file for the sequence-parallel forward")
    p.add_argument("--cpu-devices", type=int, default=0, help="simulate N CPU devices")
    p.add_argument("--dtype", help="parameter/compute dtype override, e.g. float32")
    p.add_argument("--template", choices=("qwen2", "llama_3"), help="default: from the LLM")
    p.add_argument(
        "--no-newline",
        action="store_true",
        help="no '\\n' after each frame (upstream V-NIAH); default follows our training",
    )
    p.add_argument("--encode-batch", type=int, default=32, help="frames per vision call")


def _setup(args):
    """Starts jax (with simulated devices if asked); returns (model, tokenizer, mesh)."""
    import jax

    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    from longvila_jax.ckpt.pretrained import load_pretrained, load_tokenizer

    model = load_pretrained(args.model, dtype=args.dtype)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    mesh = None
    if args.mesh:
        from longvila_jax.parallel.mesh import load_mesh_config, make_mesh, validate_mesh

        mcfg = load_mesh_config(args.mesh)
        validate_mesh(
            mcfg,
            jax.device_count(),
            num_heads=model.cfg.llm.num_attention_heads,
            num_kv_heads=model.cfg.llm.num_key_value_heads,
        )
        mesh = make_mesh(mcfg)
    return model, tokenizer, mesh


def _run(fn: Callable[[], int]) -> int:
    try:
        return fn()
    except (InputError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def vniah_main(argv: list[str] | None = None) -> int:
    """``python -m longvila_jax.eval.vniah``; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m longvila_jax.eval.vniah", description="V-NIAH")
    _common(p)
    p.add_argument("--haystack", required=True, help="haystack video (decoded at 1 fps)")
    p.add_argument("--needles", required=True, help="needles folder (longvila_jax.eval.needles)")
    p.add_argument("--frames", required=True, type=parse_numbers, help="e.g. 8,16 or 300:6000:300")
    p.add_argument(
        "--depths", type=lambda s: parse_numbers(s, float), default="0,0.2,0.4,0.6,0.8,1"
    )
    p.add_argument("--out", default="vniah_out", help="results folder")
    p.add_argument("--batch-size", type=int, default=1, help="depths per forward")
    p.add_argument("--title", default="V-NIAH")
    args = p.parse_args(argv)

    def go() -> int:
        from longvila_jax.eval.vniah import run_vniah

        model, tokenizer, mesh = _setup(args)
        res = run_vniah(
            model,
            tokenizer,
            args.haystack,
            args.needles,
            args.frames,
            args.depths,
            mesh=mesh,
            out_dir=args.out,
            template=args.template,
            newline_after_frame=not args.no_newline,
            batch_size=args.batch_size,
            encode_batch=args.encode_batch,
            title=args.title,
            progress=True,
        )
        print(f"V-NIAH mean score {res['mean_score']:.4f} ({res['seconds']} s); wrote {args.out}")
        return 0

    return _run(go)


def videomme_main(argv: list[str] | None = None) -> int:
    """``python -m longvila_jax.eval.videomme``; returns the exit status."""
    p = argparse.ArgumentParser(
        prog="python -m longvila_jax.eval.videomme", description="VideoMME-style evaluation"
    )
    _common(p)
    p.add_argument("--annotations", required=True, help=".parquet / .json / .jsonl")
    p.add_argument("--videos", required=True, help="folder with <videoID>.mp4")
    p.add_argument("--frames", required=True, type=int, help="frames per video (uniform)")
    p.add_argument("--out", default="videomme_out", help="results folder")
    p.add_argument("--limit", type=int, help="only the first N questions")
    args = p.parse_args(argv)

    def go() -> int:
        from longvila_jax.eval.videomme import run_videomme

        model, tokenizer, mesh = _setup(args)
        res = run_videomme(
            model,
            tokenizer,
            args.annotations,
            args.videos,
            args.frames,
            mesh=mesh,
            out_dir=args.out,
            template=args.template,
            newline_after_frame=not args.no_newline,
            encode_batch=args.encode_batch,
            limit=args.limit,
        )
        acc = res["accuracy"]
        parts = [
            f"{k} {v['accuracy']:.3f} ({v['correct']}/{v['total']})"
            for k, v in acc.items()
            if v["total"]
        ]
        print("VideoMME accuracy: " + ", ".join(parts) + f"; wrote {args.out}")
        return 0

    return _run(go)
