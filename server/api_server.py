"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of an `AsyncEngine`.

Lifecycle: the engine core is started (and ready) before the port is bound. If the core dies,
/health answers 503 and the server exits with status 1 a moment later. SIGTERM or Ctrl-C: uvicorn
stops accepting, lets in-flight requests finish for up to `--shutdown-timeout` seconds, cancels
the rest (aborting them), then the core process is stopped; exit status 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

import compiled_llm
from compiled_llm.server.engine_client import AsyncEngine, EngineDeadError
from compiled_llm.server.metrics import ServerMetrics
from compiled_llm.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from compiled_llm.server.serving import OpenAIServing

logger = logging.getLogger(__name__)
_DEAD_EXIT_DELAY_S = 1.0  # /health answers 503 this long before the server exits


@dataclass
class ServerSettings:
    model_names: list[str]
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_waiting_requests: int | None = None
    shutdown_timeout: float = 10.0
    log_level: str = "info"
    engine_kwargs: dict[str, Any] = field(default_factory=dict)


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(APIError(status, message, param).body(), status_code=status)


class _APIKeyMiddleware:
    """401 on /v1/* without `Authorization: Bearer KEY` (plain ASGI: streams stay untouched)."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if scope["method"] != "OPTIONS" and not secrets.compare_digest(given, self.expected):
                response = _error(401, "missing or wrong API key (Authorization: Bearer ...)")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Server(uvicorn.Server):
    """uvicorn, plus: once shutdown starts, requests still running after `grace` seconds are
    aborted and answered with an error, so they end cleanly rather than being cancelled."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, grace: float) -> None:
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


def build_app(engine: AsyncEngine, settings: ServerSettings, metrics: ServerMetrics) -> FastAPI:
    app = FastAPI(title="compiled-llm", version=compiled_llm.__version__)
    serving = OpenAIServing(engine, settings.model_names, metrics)
    profile_dir = engine.config.observability_config.profile_dir

    if settings.api_key:
        app.add_middleware(_APIKeyMiddleware, key=settings.api_key)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON: {first.get('msg', '')}")
        param = ".".join(loc) or None
        return _error(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail))

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, e: EngineDeadError) -> JSONResponse:
        return _error(503, str(e))

    @app.exception_handler(Exception)
    async def internal(_: Request, e: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return _error(500, f"{type(e).__name__}: {e}")

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_alive:
            return _error(503, engine.dead_reason or "the engine core is not running")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, Any]:
        pid = engine.client.pid if engine.client else None
        return {
            "version": compiled_llm.__version__,
            "api_server_pid": os.getpid(),
            "engine_core_pid": pid,
        }

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
        serving.check_model(body.model)
        tokenizer = engine.tokenizer
        if tokenizer is None:
            raise APIError(400, "this server has no tokenizer (skip_tokenizer_init)")
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", "prompt")
        if body.messages is not None:
            chat_req = ChatCompletionRequest(
                messages=body.messages, add_generation_prompt=body.add_generation_prompt
            )
            tokens = serving._admit(lambda: serving._chat_prompt(chat_req))["prompt_token_ids"]
        else:
            tokens = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        mc = engine.config.model_config
        return {"count": len(tokens), "max_model_len": mc.max_model_len, "tokens": list(tokens)}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        serving.check_model(body.model)
        if engine.tokenizer is None:
            raise APIError(400, "this server has no tokenizer (skip_tokenizer_init)")
        vocab = int(engine.config.model_config.hf_config.vocab_size)
        bad = [t for t in body.tokens if t >= vocab]
        if bad:
            raise APIError(400, f"tokens outside the vocabulary [0, {vocab}): {bad[:5]}", "tokens")
        return {"prompt": engine.tokenizer.decode(body.tokens)}

    async def _utility(name: str, *, needs_profile_dir: bool = False) -> Any:
        if needs_profile_dir and profile_dir is None:
            raise APIError(400, "profiling is off: start the server with --profile-dir")
        try:
            return await engine.call_utility(name, timeout=600.0)
        except RuntimeError as e:
            if isinstance(e, EngineDeadError):
                raise
            raise APIError(500, str(e)) from e

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


async def serve(settings: ServerSettings) -> int:
    """Start the engine core, then serve HTTP until SIGTERM/SIGINT (0) or core death (1)."""
    loop = asyncio.get_running_loop()
    metrics = ServerMetrics(settings.model_names[0])
    engine = AsyncEngine(
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
        access_log=settings.log_level == "debug",
    )
    server = _Server(config, engine, settings.shutdown_timeout)

    def on_dead(reason: str) -> None:
        loop.call_later(_DEAD_EXIT_DELAY_S, setattr, server, "should_exit", True)

    engine.on_dead.append(on_dead)
    try:
        await server.serve()
    finally:
        await engine.shutdown()
    if engine.dead_reason is not None:
        logger.error("exiting: %s", engine.dead_reason)
        return 1
    return 0
