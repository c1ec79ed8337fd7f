"""Command line: serve a model over an OpenAI-compatible HTTP API with a one-page UI.

    python -m longvila_jax.serve --model DIR [--model-id NAME] [--mesh M.yaml]
        [--host 127.0.0.1] [--port 8000] [--media-root DIR] [--api-key KEY]
        [--log-requests] [--cpu-devices 8] [limits: --max-frames N --max-queue N ...]

The model is loaded, verified and compiled in the background while the server listens:
``GET /health`` answers 503 until it is ready. The API key may also come from the environment
variable ``LONGVILA_API_KEY`` (a flag's value is visible to other users in ``ps``). SIGTERM or
Ctrl-C stops accepting connections, lets in-flight requests finish (at most
``--drain-timeout-s``), then exits 0.

Exit status: 0 after a clean shutdown; 1 the model could not be loaded (one ``error:`` line);
2 a bad argument.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path

from longvila_jax.serve import limits as limits_mod


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m longvila_jax.serve",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="project checkpoint or VILA-layout dir")
    parser.add_argument("--model-id", help="the name clients send as `model` (default: dir name)")
    parser.add_argument("--mesh", help="mesh file (configs/mesh/*.yaml); default one device")
    parser.add_argument("--cpu-devices", type=int, help="simulate this many CPU devices (testing)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: from --model)")
    parser.add_argument("--template", choices=("qwen2", "llama_3"), help="built-in chat template")
    parser.add_argument("--dtype", help="parameter/compute dtype, e.g. bfloat16")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--media-root", help="folder whose files requests may name by path")
    parser.add_argument("--api-key", help="bearer token required on /v1/* and /metrics")
    parser.add_argument(
        "--log-requests", action="store_true", help="log prompts and media sizes (off: never)"
    )
    limits_mod.add_flags(parser)
    return parser


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server without re-raising SIGTERM / SIGINT after a graceful shutdown:
        a drained shutdown is a clean exit (status 0), not a death by signal."""

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                try:
                    yield
                finally:
                    self._captured_signals.clear()

    return Server


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        limits = limits_mod.from_args(args)
    except ValueError as e:
        parser.error(str(e))
    if args.media_root is not None and not Path(args.media_root).is_dir():
        parser.error(f"--media-root {args.media_root} is not a directory")
    if not 0 <= args.port < 65536:
        parser.error(f"--port must be in [0, 65535], got {args.port}")
    api_key = args.api_key or os.environ.get("LONGVILA_API_KEY") or None
    if args.cpu_devices:
        import jax  # the platform must be set before a backend starts (infer CLI's note)

        if not os.environ.get("JAX_PLATFORMS"):
            jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    import uvicorn

    _Server = _server_class()
    from longvila_jax.serve.app import create_app
    from longvila_jax.serve.service import ModelSpec, Service

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    spec = ModelSpec(
        model=args.model,
        model_id=args.model_id or Path(args.model).resolve().name,
        mesh=args.mesh,
        tokenizer=args.tokenizer,
        template=args.template,
        dtype=args.dtype,
        media_root=args.media_root,
    )
    service = Service(spec, limits)
    failure: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_load_failure(e: BaseException) -> None:
        failure.append(e)
        if server is not None:
            server.should_exit = True

    app = create_app(
        service,
        api_key=api_key,
        log_requests=args.log_requests,
        draining=lambda: server is not None and server.should_exit,
        on_load_failure=on_load_failure,
    )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        timeout_graceful_shutdown=int(limits.drain_timeout_s),
        log_level="info",
    )
    server = _Server(config)
    server.run()
    if failure:
        print(f"error: {service.error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
