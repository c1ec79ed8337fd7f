"""Command line: answer a question about a video with MM-SP inference, streaming to stdout.

    python -m longvila_jax.infer --model DIR --video file.mp4 [--frames N | --fps F]
        [--mesh configs/mesh/cpu8_r2u4.yaml] [--cpu-devices 8] [--max-new-tokens 128]
        [--temperature 0] [--top-p 1] [--seed 0] [--stop TOKEN ...] "question"

``--model`` is a project checkpoint or a VILA-layout directory (``ckpt.load_pretrained``); the
tokenizer comes from the same directory unless ``--tokenizer`` is given. Prompts use the
checkpoint's own chat template (``infer.chat_format``) unless ``--template`` names a built-in one.

Frames: a checkpoint that carries an upstream top-level config (``infer.release``) follows
upstream's inference rule (``infer.frames``): ``fps > 0`` takes one frame every 1/fps seconds
from the start, at most ``--frames``; ``fps == 0`` spreads ``--frames`` over the whole video;
both default to the config's ``num_video_frames`` / ``fps``. Other checkpoints use the training
rule: ``--frames`` (default 8) uniform frames, or about ``--fps`` frames per second for a video
shorter than frames / fps seconds. Timings go to stderr.

Exit status: 0 answered; 1 a bad input (a missing, garbage or tampered model directory, an
unreadable video, a bad mesh file: any ``core.errors.InputError``), named on one ``error: ...``
line without a traceback; 2 a bad argument.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax

from longvila_jax.ckpt.pretrained import load_pretrained, load_tokenizer
from longvila_jax.core.errors import InputError
from longvila_jax.data.skips import SampleSkipped
from longvila_jax.infer.generate import Generator
from longvila_jax.infer.release import read_release_config
from longvila_jax.infer.sampling import SamplingParams
from longvila_jax.parallel.mesh import load_mesh_config, make_mesh


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m longvila_jax.infer",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("question", help="the question about the video")
    parser.add_argument(
        "--model", required=True, help="project checkpoint or VILA-layout directory"
    )
    parser.add_argument("--video", required=True, help="video file")
    parser.add_argument(
        "--frames", type=int, help="frames to sample (max with --fps); default: config or 8"
    )
    parser.add_argument(
        "--fps", type=float, help="frames per second to sample; default: config or 0 (uniform)"
    )
    parser.add_argument(
        "--template",
        choices=("qwen2", "llama_3"),
        help="built-in chat template (default: the checkpoint's own)",
    )
    parser.add_argument("--mesh", help="mesh file (configs/mesh/*.yaml); default one device")
    parser.add_argument("--cpu-devices", type=int, help="simulate this many CPU devices (testing)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: from --model)")
    parser.add_argument("--dtype", help="parameter/compute dtype, e.g. bfloat16 (default: config)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[], help="extra stop token (repeatable)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.frames is not None and args.frames < 1:
        print("error: --frames must be >= 1", file=sys.stderr)
        return 2
    if args.fps is not None and args.fps < 0:
        print("error: --fps must be >= 0", file=sys.stderr)
        return 2
    if args.cpu_devices:
        # Simulated devices are CPU devices. ``python -m`` has imported jax already (through
        # the package), so JAX_PLATFORMS is no longer read: the platform is set in jax's config,
        # which counts until a backend starts (importing jax starts none).
        if not os.environ.get("JAX_PLATFORMS"):
            jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    try:
        # Every SamplingParams field is the flag of the same name (--max-new-tokens ...).
        fields = dataclasses.fields(SamplingParams)
        sampling = SamplingParams(**{field.name: getattr(args, field.name) for field in fields})
        mesh_cfg = load_mesh_config(args.mesh) if args.mesh else None
        mesh = make_mesh(mesh_cfg) if mesh_cfg else None
        model = load_pretrained(args.model, dtype=args.dtype)
        tokenizer = load_tokenizer(args.tokenizer or args.model)
        release = read_release_config(args.model)
        block_size = mesh_cfg.block_size if mesh_cfg else 1
        generator = Generator(
            model,
            tokenizer,
            mesh=mesh,
            block_size=block_size,
            block_kernel=mesh_cfg.block_kernel if mesh_cfg else "auto",
            template=args.template,
            release=release,
        )
        result = generator.generate(
            args.question,
            video=args.video,
            num_frames=args.frames,
            fps=args.fps,
            sampling=sampling,
            on_text=lambda piece: print(piece, end="", flush=True),
        )
    except (InputError, SampleSkipped, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(flush=True)
    print(
        f"[{result.num_frames} frames, {result.prompt_tokens} prompt tokens, "
        f"{len(result.tokens)} new tokens ({result.finish_reason}); "
        f"first token {result.prefill_s:.2f} s, {1e3 * result.decode_s_per_token:.1f} ms/token]",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
