"""Shared pieces of the evaluation command lines (``python -m longvila_jax.eval.vniah`` /
``.videomme``; each ``main`` lives in its own module, and this module imports neither).

Number lists (``8,16,32`` or ``start:stop:step``, stop included), the options every evaluation
takes, loading the model and tokenizer (``ckpt.load_pretrained``; the tokenizer from the
checkpoint or ``--tokenizer``), the optional mesh file, and ``--cpu-devices`` to simulate
devices on a CPU host (set before the jax backend starts: importing jax does not start it).
Errors in the inputs (any ``core.errors.InputError``: a missing, garbage or tampered model
directory, a bad mesh file, malformed annotations) exit with status 2 and a one-line
``error: ...`` message naming the problem, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import jax

from longvila_jax.ckpt.pretrained import load_pretrained, load_tokenizer
from longvila_jax.core.errors import InputError
from longvila_jax.infer.chat_format import chat_format
from longvila_jax.infer.release import read_release_config
from longvila_jax.parallel.mesh import load_mesh_config, make_mesh, validate_mesh


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


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, tokenizer, mesh, device, dtype and prompt options of every evaluation."""
    parser.add_argument("--model", required=True, help="project checkpoint or VILA-layout folder")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the model's)")
    parser.add_argument("--mesh", help="mesh file for the sequence-parallel forward")
    parser.add_argument("--cpu-devices", type=int, default=0, help="simulate N CPU devices")
    parser.add_argument("--dtype", help="parameter/compute dtype override, e.g. float32")
    parser.add_argument(
        "--template",
        choices=("qwen2", "llama_3"),
        help="built-in chat template (default: the checkpoint's own, infer.chat_format)",
    )
    parser.add_argument(
        "--no-newline",
        action="store_true",
        help="no '\\n' after each frame (upstream V-NIAH); default follows our training",
    )
    parser.add_argument("--encode-batch", type=int, default=32, help="frames per vision call")


def setup(args: argparse.Namespace):
    """Starts jax (with simulated devices if asked); returns (model, tokenizer, mesh or None)."""
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    model = load_pretrained(args.model, dtype=args.dtype)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    mesh = None
    if args.mesh:
        mesh_cfg = load_mesh_config(args.mesh)
        validate_mesh(
            mesh_cfg,
            jax.device_count(),
            num_heads=model.cfg.llm.num_attention_heads,
            num_kv_heads=model.cfg.llm.num_key_value_heads,
        )
        mesh = make_mesh(mesh_cfg)
    return model, tokenizer, mesh


def run_command(args: argparse.Namespace, evaluate: Callable[..., str]) -> int:
    """Runs one evaluation command after its arguments were parsed.

    Loads the model (:func:`setup`), calls ``evaluate(model, tokenizer, **options)`` with the
    options every ``run_*`` takes from the common flags (``mesh``, ``template``,
    ``newline_after_frame``, ``encode_batch``) and prints the summary line it returns. Without
    ``--template`` the template is the checkpoint's own (``infer.chat_format.chat_format`` with
    the release config's named template and BOS rule, ``infer.release``).

    Returns:
      The exit status: 0, or 2 with one ``error: ...`` line for a bad input.
    """
    try:
        model, tokenizer, mesh = setup(args)
        template = args.template
        if template is None:
            release = read_release_config(args.model)
            named = release.chat_template if release is not None else None
            template = chat_format(tokenizer, model.cfg.llm.arch, named, release is not None)
        options = dict(
            mesh=mesh,
            template=template,
            newline_after_frame=not args.no_newline,
            encode_batch=args.encode_batch,
        )
        print(evaluate(model, tokenizer, **options))
    except (InputError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


__all__ = ["add_common_arguments", "parse_numbers", "run_command", "setup"]
