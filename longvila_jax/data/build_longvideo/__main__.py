"""``python -m longvila_jax.data.build_longvideo VIDEOS_DIR OUT_DIR --captioner S --writer S``.

Builds LongVILA-style long-video instruction data from a folder of videos: every video is
probed and cut into clips (default 10 s, by timestamps, nothing re-encoded), a captioner backend
describes every clip, a writer LLM turns each video's ordered clip captions into a summary and
question-answer pairs in named categories, and the strictly checked result is a VILA-format
manifest that ``python -m longvila_jax.data.check`` accepts and stage 5 trains on
(``longvila_jax/longvideo/``, ``docs/longvideo_engine.md``).

Backends (``--captioner``, ``--writer``): ``local:DIR`` (a checkpoint of ours, in this process,
batched), ``openai:URL[#model]`` (any OpenAI-compatible chat endpoint; key from
``$OPENAI_API_KEY`` or ``--api-key-env``), ``oracle`` (the synthetic corpus' ground truth).
Every stage is resumable: rerun the same command to go on after a crash or a failed request.

Exit status: 0 done (failures are counted in the summary); 1 bad input (one ``error:`` line);
2 bad arguments or config (one ``config error:`` line).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from longvila_jax.backends.spec import open_backend, parse_spec
from longvila_jax.core.errors import ConfigError, InputError
from longvila_jax.longvideo.pipeline import BuildSettings, build
from longvila_jax.longvideo.probe import ClipSettings
from longvila_jax.longvideo.prompts import load_prompt, prompt_file
from longvila_jax.longvideo.store import STAGES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m longvila_jax.data.build_longvideo", description=__doc__.splitlines()[0]
    )
    p.add_argument("videos_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--captioner", required=True, help="local:DIR | openai:URL[#model] | oracle")
    p.add_argument("--writer", required=True, help="local:DIR | openai:URL[#model] | oracle")
    p.add_argument("--clip-seconds", type=float, default=10.0)
    p.add_argument("--min-clip-seconds", type=float, default=2.0)
    p.add_argument("--min-video-seconds", type=float, default=20.0)
    p.add_argument("--frames-per-clip", type=int, default=8)
    p.add_argument("--caption-prompt", default="v1", help="version: caption_<v>.yaml")
    p.add_argument("--writer-prompt", default="v1", help="version: writer_<v>.yaml")
    p.add_argument("--prompts", type=Path, default=None, help="folder of prompt files")
    p.add_argument("--caption-batch", type=int, default=8)
    p.add_argument("--writer-batch", type=int, default=4)
    p.add_argument("--writer-retries", type=int, default=2)
    p.add_argument("--probe-timeout-s", type=float, default=60.0)
    g = p.add_argument_group("openai: endpoints")
    g.add_argument("--timeout-s", type=float, default=120.0, help="per request")
    g.add_argument("--retries", type=int, default=3, help="per request, with backoff")
    g.add_argument("--backoff-s", type=float, default=1.0, help="base of the backoff")
    g.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    g.add_argument("--media", choices=("frames", "video"), default="frames")
    g.add_argument("--frame-size", type=int, default=448)
    g.add_argument("--api-key-env", default="OPENAI_API_KEY")
    g = p.add_argument_group("local: checkpoints")
    g.add_argument("--mesh", default=None, help="mesh YAML (default: one device)")
    g.add_argument("--local-batch", type=int, default=8, help="rows generated together")
    p.add_argument("--limit", type=int, default=None, help="only the first N videos")
    p.add_argument("--restart-from", choices=STAGES, default=None)
    p.add_argument("--no-progress", action="store_true")
    return p


def _backend_options(spec: str, a: argparse.Namespace) -> dict:
    kind = parse_spec(spec)[0]
    if kind == "openai":
        return {
            "timeout_s": a.timeout_s,
            "retries": a.retries,
            "backoff_s": a.backoff_s,
            "concurrency": a.concurrency,
            "media": a.media,
            "frame_size": a.frame_size,
            "api_key_env": a.api_key_env,
        }
    if kind == "local":
        return {"mesh": a.mesh, "batch_size": a.local_batch}
    return {}


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    backends = {}
    try:
        if a.limit is not None and a.limit < 1:
            raise ConfigError("--limit", "must be >= 1")
        settings = BuildSettings(
            clips=ClipSettings(a.clip_seconds, a.min_clip_seconds, a.min_video_seconds),
            frames_per_clip=a.frames_per_clip,
            caption_batch=a.caption_batch,
            writer_batch=a.writer_batch,
            writer_retries=a.writer_retries,
            probe_timeout_s=a.probe_timeout_s,
            limit=a.limit,
            restart_from=a.restart_from,
            progress=not a.no_progress,
        )
        for name, value in (
            ("--frames-per-clip", a.frames_per_clip),
            ("--caption-batch", a.caption_batch),
            ("--writer-batch", a.writer_batch),
        ):
            if value < 1:
                raise ConfigError(name, "must be >= 1")
        if a.writer_retries < 0:
            raise ConfigError("--writer-retries", "must be >= 0")
        prompts = {
            "captioner": load_prompt(
                prompt_file("captioner", a.caption_prompt, a.prompts), "captioner"
            ),
            "writer": load_prompt(prompt_file("writer", a.writer_prompt, a.prompts), "writer"),
        }
        for spec in (a.captioner, a.writer):
            parse_spec(spec)  # a bad spec is a config error before anything loads
        for role, spec in (("captioner", a.captioner), ("writer", a.writer)):
            backends[role] = open_backend(spec, role, **_backend_options(spec, a))
    except (ConfigError, ValueError) as e:
        for b in backends.values():
            b.close()
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        summary = build(a.videos_dir, a.out_dir, backends, prompts, settings)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        for b in backends.values():
            b.close()
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
