"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of an `AsyncLLM`.

Lifecycle: the port is bound first (a busy port fails before the model loads), then the engine
core is started; connections are accepted once it is ready. If the core dies,
/health answers 503 and the server exits with status 1 a moment later. SIGTERM or Ctrl-C: uvicorn
stops accepting, lets in-flight requests finish for up to `--shutdown-timeout` seconds, cancels
the rest (aborting them), then the core process is stopped; exit status 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import signal
import socket
import time
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import compiled_llm
from compiled_llm.server.async_llm import AsyncLLM, EngineDeadError, UtilityRefusedError
from compiled_llm.server.metrics import ServerMetrics
from compiled_llm.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from compiled_llm.server.serving import OpenAIServing
from compiled_llm.server.settings import ServerSettings

logger = logging.getLogger(__name__)
_DEAD_EXIT_DELAY_S = 1.0  # /health answers 503 this long before the server exits


class _ErrorResponse(JSONResponse):
    """An OpenAI-shaped error, rendered as ASCII JSON: a message that quotes the request's text
    (a lone surrogate, say) must not fail to encode."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(APIError(status, message, param).body(), status_code=status)

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


class _APIKeyMiddleware:
    """401 without `Authorization: Bearer KEY` on every path but /health and the ones the
    operator left open (plain ASGI: streams stay untouched)."""

    def __init__(self, app: ASGIApp, key: str, open_paths: tuple[str, ...]) -> None:
        self.app = app
        self.expected = f"Bearer {key}".encode()
        self.open_paths = {"/health", *open_paths}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if scope["method"] != "OPTIONS" and not secrets.compare_digest(given, self.expected):
                response = _ErrorResponse(
                    401, "missing or wrong API key (Authorization: Bearer ...)"
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over the server's limit of {limit} bytes")


class _BodyLimitMiddleware:
    """413 in OpenAI's error shape past `limit` bytes of body: at once for a declared
    Content-Length, else as the bytes arrive (raised from `receive`, which FastAPI passes on as
    an HTTPException to our handler). FastAPI's own `max_body_size` answers a declared length in
    plain text, in place of any response the app sends."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.limit:
            error = _BodyTooLarge(self.limit)
            await _ErrorResponse(error.status_code, error.detail)(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLarge(self.limit)
            return message

        await self.app(scope, counted, send)


class _InternalErrorMiddleware:
    """An unexpected exception becomes a 500 with a generic message (the details go to the
    log), sent as a complete response so the keep-alive connection survives. Starlette's own
    handler for `Exception` re-raises after answering, which makes uvicorn drop the connection."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception:
            logger.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if started:
                raise
            await _ErrorResponse(500, "internal server error")(scope, receive, send)


class _Server(uvicorn.Server):
    """uvicorn, plus: once shutdown starts, requests still running after `grace` seconds are
    aborted and answered with an error, so they end cleanly rather than being cancelled."""

    def __init__(self, config: uvicorn.Config, engine: AsyncLLM, grace: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.grace = grace

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.grace, self.engine.abort_all, "the server is shutting down")
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


def build_app(engine: AsyncLLM, settings: ServerSettings, metrics: ServerMetrics) -> FastAPI:
    docs = settings.enable_docs
    app = FastAPI(
        title="compiled-llm",
        version=compiled_llm.__version__,
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    serving = OpenAIServing(engine, settings.model_names, metrics, settings.limits, settings.chat)
    profile_dir = engine.config.observability_config.profile_dir

    # Outermost last: CORS (a browser's preflight is answered before the key is asked for, and
    # every response, errors included, carries the headers), errors, the key, the body limit,
    # then the routes.
    app.add_middleware(_BodyLimitMiddleware, limit=settings.max_request_body_bytes)
    if settings.api_key:
        app.add_middleware(
            _APIKeyMiddleware, key=settings.api_key, open_paths=settings.unauthenticated_endpoints
        )
    app.add_middleware(_InternalErrorMiddleware)
    cors = settings.cors
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(cors.allowed_origins),
        allow_methods=list(cors.allowed_methods),
        allow_headers=list(cors.allowed_headers),
        allow_credentials=cors.allow_credentials,
    )

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return _ErrorResponse(e.status, e.message, e.param)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, e: RequestValidationError) -> JSONResponse:
        # A union field (prompt, stop) fails once per member: report the most telling failure,
        # a value refused rather than a member of the wrong type, deepest first.
        errors = e.errors()
        first = (
            min(errors, key=lambda x: (x["type"].endswith("_type"), -len(x["loc"])))
            if errors
            else {}
        )
        if first.get("type") == "json_invalid":
            return _ErrorResponse(400, f"the body is not valid JSON: {first.get('msg', '')}")
        param = _param(first.get("loc", ()))
        return _ErrorResponse(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return _ErrorResponse(e.status_code, str(e.detail))

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, e: EngineDeadError) -> JSONResponse:
        return _ErrorResponse(503, str(e))

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_alive:
            return _ErrorResponse(503, engine.dead_reason or "the engine core is not running")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, Any]:
        return {"version": compiled_llm.__version__}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        mc = engine.config.model_config
        created = int(time.time())
        data = [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "compiled-llm",
                "root": mc.model,
                "max_model_len": mc.max_model_len,
            }
            for name in settings.model_names
        ]
        return {"object": "list", "data": data}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        return await serving.completions(body, raw)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, raw: Request) -> Response:
        return await serving.chat(body, raw)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        return await serving.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        return await serving.detokenize(body)

    async def _utility(name: str, *, needs_profile_dir: bool = False) -> Any:
        if needs_profile_dir and profile_dir is None:
            raise APIError(400, "profiling is off: start the server with --profile-dir")
        try:
            return await engine.call_utility(name, timeout=600.0)
        except UtilityRefusedError as e:  # e.g. a profile is already running
            raise APIError(409, str(e)) from e

    @app.post("/start_profile")
    async def start_profile() -> Response:
        await _utility("start_profile", needs_profile_dir=True)
        return Response(status_code=200)

    @app.post("/stop_profile")
    async def stop_profile() -> dict[str, Any]:
        """Ends the window; answers with the trace file the engine core wrote."""
        trace = await _utility("stop_profile", needs_profile_dir=True)
        return {"trace": trace if isinstance(trace, str) else None}

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> Response:
        await _utility("reset_prefix_cache")
        return Response(status_code=200)

    return app


def _param(loc: tuple[int | str, ...]) -> str | None:
    """The field path of a validation error: `messages.0.content`, without the `body` prefix
    and the union-member tags pydantic appends (`function-after[...]`, `list[int]`)."""
    parts: list[str] = []
    for part in loc[1:] if loc[:1] == ("body",) else loc:
        if isinstance(part, int) or part.isidentifier():
            parts.append(str(part))
    return ".".join(parts) or None


def bind(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound now so a busy port fails before the model loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', e)}") from None
    return sock


async def serve(settings: ServerSettings) -> int:
    """Bind the port, start the engine core, then serve HTTP until SIGTERM/SIGINT (0) or core
    death (1)."""
    sock = bind(settings.host, settings.port)
    try:
        return await _serve(settings, sock)
    finally:
        sock.close()


async def _serve(settings: ServerSettings, sock: socket.socket) -> int:
    loop = asyncio.get_running_loop()
    metrics = ServerMetrics(settings.model_names[0])
    engine = AsyncLLM(
        settings.engine_kwargs,
        max_waiting_requests=settings.max_waiting_requests,
        metrics=metrics,
    )
    main = asyncio.current_task()
    assert main is not None
    for sig in (signal.SIGINT, signal.SIGTERM):  # until uvicorn installs its own
        loop.add_signal_handler(sig, main.cancel)
    try:
        started = time.monotonic()
        await engine.start()
    except asyncio.CancelledError:
        logger.warning("interrupted while the engine core was starting")
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    assert engine.ready is not None
    logger.info(
        "engine core (pid %d) ready in %.1f s: %d KV blocks",
        engine.ready.pid,
        time.monotonic() - started,
        engine.ready.num_blocks,
    )
    # uvicorn re-raises the signal it stopped on once it returns; ours then does nothing, so
    # the engine core is stopped below instead of the process dying on the spot.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    app = build_app(engine, settings, metrics)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_timeout) + 5,  # a backstop
        access_log=settings.access_log,
    )
    server = _Server(config, engine, settings.shutdown_timeout)

    def on_dead(reason: str) -> None:
        loop.call_later(_DEAD_EXIT_DELAY_S, setattr, server, "should_exit", True)

    engine.on_dead.append(on_dead)
    try:
        await server.serve(sockets=[sock])
    finally:
        await engine.shutdown()
    if engine.dead_reason is not None:
        logger.error("exiting: %s", engine.dead_reason)
        return 1
    return 0
