"""The HTTP API (FastAPI): routes, authentication, body limits and OpenAI-style errors.

Routes:

- ``POST /v1/chat/completions``: OpenAI's chat completions, streamed (SSE) or not.
- ``GET /v1/models``: the one served model.
- ``GET /health``: 200 ``{"status": "ok"}`` once the model is loaded and compiled; 503 with
  ``loading``, ``failed`` or ``draining`` otherwise.
- ``GET /metrics``: Prometheus text (``serve.metrics``).
- ``GET /``: the one-page UI (``ui.html``).

With ``api_key``, ``/v1/*`` and ``/metrics`` need ``Authorization: Bearer <key>`` (401
otherwise); ``/health`` and the page itself stay open (the page asks for the key). Every error,
including unknown routes and unexpected failures, is ``{"error": {"message", "type", "param",
"code"}}``; a failure of ours is a 500 whose message names no internals, and the server keeps
serving. Prompts and media are never logged unless ``log_requests``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from longvila_jax.serve import openai_format as fmt
from longvila_jax.serve.errors import APIError
from longvila_jax.serve.request import ChatRequest, parse_body
from longvila_jax.serve.service import Service

log = logging.getLogger("longvila_jax.serve")
UI = Path(__file__).with_name("ui.html")


def outcome_of(status: int) -> str:
    """The metrics outcome of an error status."""
    if status in (429, 503):
        return "rejected"
    if status == 504:
        return "timeout"
    return "bad_request" if status < 500 else "error"


def create_app(
    service: Service,
    *,
    api_key: str | None = None,
    log_requests: bool = False,
    draining: Callable[[], bool] = lambda: False,
    on_load_failure: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The ASGI app around a :class:`~longvila_jax.serve.service.Service`.

    Args:
      service: the model service; its ``load`` runs on a thread when the app starts.
      api_key: the bearer token ``/v1/*`` and ``/metrics`` need, or None.
      log_requests: log each request's text and media sizes (off: only outcomes and sizes).
      draining: whether the server is shutting down (new requests get 503).
      on_load_failure: called (on the loading thread) when the model cannot be loaded.
    """
    pool = concurrent.futures.ThreadPoolExecutor(
        max_workers=service.limits.decode_workers, thread_name_prefix="longvila-media"
    )

    def load() -> None:
        try:
            service.load()
            log.info("model %s ready", service.spec.model_id)
        except BaseException as e:  # noqa: BLE001 - reported, and the server stops
            service.state, service.error = "failed", f"{type(e).__name__}: {e}"
            log.error("loading %s failed: %s", service.spec.model, service.error)
            if on_load_failure is not None:
                on_load_failure(e)

    async def lifespan(app):
        threading.Thread(target=load, name="longvila-load", daemon=True).start()
        yield
        await asyncio.to_thread(service.close)
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="longvila-jax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        error = APIError(
            e.status_code, str(e.detail), None, "not_found" if e.status_code == 404 else ""
        )
        return JSONResponse(error.body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        log.exception("unexpected failure on %s", request.url.path)
        error = APIError(500, "internal server error", None, "server_error")
        return JSONResponse(error.body(), status_code=500)

    def authorise(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), api_key.encode()
        ):
            raise APIError(
                401,
                "missing or wrong API key (Authorization: Bearer <key>)",
                None,
                "invalid_api_key",
            )

    async def read_body(request: Request) -> bytes:
        cap = service.limits.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > cap):
            raise APIError(413, f"the body is over --max-body-bytes {cap}", None, "body_too_large")
        chunks, size = [], 0
        async for piece in request.stream():
            size += len(piece)
            if size > cap:
                raise APIError(
                    413, f"the body is over --max-body-bytes {cap}", None, "body_too_large"
                )
            chunks.append(piece)
        return b"".join(chunks)

    @app.get("/health")
    async def health():
        state = "draining" if draining() else service.state
        body = {"status": "ok" if state == "ready" else state, "model": service.spec.model_id}
        if service.error:
            body["error"] = service.error
        return JSONResponse(body, status_code=200 if state == "ready" else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        authorise(request)
        return {"object": "list", "data": [service.describe()]}

    @app.get("/metrics")
    async def metrics(request: Request):
        authorise(request)
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(UI.read_text(encoding="utf-8"))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        service.metrics.add("received")
        start = time.monotonic()
        try:
            authorise(request)
            if draining():
                raise APIError(503, "the server is shutting down", None, "shutting_down")
            if service.state != "ready":
                raise APIError(503, f"the model is {service.state}", None, "model_not_ready")
            content_type = request.headers.get("content-type", "application/json")
            if not content_type.split(";")[0].strip().lower().endswith("json"):
                raise APIError(
                    415,
                    f"Content-Type must be application/json, got {content_type[:60]}",
                    None,
                    "unsupported_media_type",
                )
            raw = await read_body(request)
            req = parse_body(
                raw,
                service.limits,
                model_id=service.spec.model_id,
                media_root=service.spec.media_root is not None,
            )
            if log_requests:
                log.info(
                    "request: %r, %d media (%s bytes), history %d",
                    req.question,
                    len(req.media),
                    [len(m.data or b"") for m in req.media],
                    len(req.history),
                )
            if not service.scheduler.admit():
                raise APIError(429, "the queue is full; retry later", None, "queue_full")
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()

            def emit(event: tuple) -> None:
                # A closed loop (RuntimeError) means nobody is listening any more.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(events.put_nowait, event)

            try:
                job = await loop.run_in_executor(pool, service.prepare, req, emit, start)
            except BaseException:
                service.scheduler.release()
                raise
            service.scheduler.submit(job)
        except APIError as e:
            service.metrics.finish(outcome_of(e.status))
            log.info("chat %d %s (%.3f s)", e.status, e.code, time.monotonic() - start)
            return JSONResponse(e.body(), status_code=e.status)
        except Exception:  # a failure of ours: counted, logged, answered without details
            service.metrics.finish("error")
            log.exception("chat request failed")
            error = APIError(500, "internal server error", None, "server_error")
            return JSONResponse(error.body(), status_code=500)
        if req.stream:
            return StreamingResponse(
                _stream(req, job, events, service),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await _collect(req, job, events, service, request)

    return app


async def _collect(
    req: ChatRequest, job, events: asyncio.Queue, service: Service, request: Request
):
    """A non-streamed answer; a client that goes away cancels its job."""
    pieces = []
    while True:
        try:
            event = await asyncio.wait_for(events.get(), timeout=0.5)
        except TimeoutError:
            if await request.is_disconnected():
                job.cancelled.set()
                return JSONResponse({}, status_code=499)
            continue
        if event[0] == "delta":
            pieces.append(event[1])
        elif event[0] == "error":
            return JSONResponse(event[1].body(), status_code=event[1].status)
        else:
            _, reason, count = event
            log.info("chat 200 %s, %d+%d tokens", reason, job.prompt_tokens, count)
            body = fmt.completion(
                fmt.completion_id(),
                req.model,
                "".join(pieces),
                reason,
                job.prompt_tokens,
                count,
                job.timings,
            )
            return JSONResponse(body)


async def _stream(req: ChatRequest, job, events: asyncio.Queue, service: Service):
    """Server-sent events of one answer (``serve.openai_format``)."""
    cid, created = fmt.completion_id(), int(time.time())
    try:
        yield fmt.sse(fmt.chunk(cid, req.model, created, {"role": "assistant", "content": ""}))
        while True:
            event = await events.get()
            if event[0] == "delta":
                yield fmt.sse(fmt.chunk(cid, req.model, created, {"content": event[1]}))
            elif event[0] == "error":
                yield fmt.sse(event[1].body())
                yield fmt.DONE
                return
            else:
                _, reason, count = event
                yield fmt.sse(
                    fmt.chunk(
                        cid, req.model, created, {}, reason, x_longvila=fmt.extras(job.timings)
                    )
                )
                if req.include_usage:
                    yield fmt.sse(
                        fmt.usage_chunk(
                            cid, req.model, created, job.prompt_tokens, count, job.timings
                        )
                    )
                yield fmt.DONE
                log.info("chat 200 (stream) %s, %d+%d tokens", reason, job.prompt_tokens, count)
                return
    finally:
        if job.outcome is None:  # the client went away (or the server is cancelling us)
            job.cancelled.set()


__all__ = ["create_app", "outcome_of"]
