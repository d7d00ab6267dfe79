"""`compiled-llm serve [MODEL]`: the OpenAI-compatible server, with vLLM's flag names."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

from compiled_llm.cli import add_engine_args, engine_kwargs
from compiled_llm.server.settings import UNAUTHENTICATED_CHOICES, RequestLimits, ServerSettings


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    p.add_argument("model", nargs="?", default=None, help="HF folder or .gguf (default: embedded)")
    p.add_argument("--model", dest="model_flag", default=None, help="same as the positional MODEL")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument(
        "--api-key",
        default=os.environ.get("COMPILED_LLM_API_KEY"),
        help="require `Authorization: Bearer KEY` on /v1/* (default: $COMPILED_LLM_API_KEY)",
    )
    g.add_argument(
        "--unauthenticated-endpoints",
        nargs="*",
        choices=UNAUTHENTICATED_CHOICES,
        default=[],
        help="endpoints that stay open with --api-key (e.g. /metrics for a scraper); /health "
        "is always open",
    )
    g.add_argument(
        "--enable-docs", action="store_true", help="serve /docs and /openapi.json (default off)"
    )
    g.add_argument(
        "--max-request-body-bytes",
        type=int,
        default=ServerSettings.max_request_body_bytes,
        help="larger request bodies are answered 413 (default %(default)s)",
    )
    g.add_argument(
        "--max-samples-per-request",
        type=int,
        default=RequestLimits.max_samples_per_request,
        help="cap on prompts x n in one request (default %(default)s)",
    )
    g.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="accept chat templates sent in requests (chat_template); refused by default",
    )
    g.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="model name(s) clients use; the first is reported (default: the model's name)",
    )
    g.add_argument(
        "--max-waiting-requests",
        type=int,
        default=None,
        help="answer 503 while more requests than this wait for their first token",
    )
    g.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="schedule step N+1 while step N runs (default on)",
    )
    g.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        help="seconds in-flight requests may finish after SIGTERM before they are aborted",
    )
    g.add_argument("--uvicorn-log-level", default="info")
    add_engine_args(p)
    p.set_defaults(func=_serve)


def default_model_name(model: str | None) -> str:
    from compiled_llm.models.loader import resolve_model

    path = resolve_model(model).rstrip("/")
    name = os.path.basename(path)
    return name.split(".")[0] if name.endswith(".gguf") else name


def _serve(args: argparse.Namespace) -> int:
    from compiled_llm.server.api_server import serve

    if args.model and args.model_flag and args.model != args.model_flag:
        raise ValueError("give the model once: positional MODEL or --model")
    model = args.model or args.model_flag
    for flag in ("max_waiting_requests", "max_request_body_bytes", "max_samples_per_request"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1")
    kwargs = dict(engine_kwargs(args), model=model, async_scheduling=args.async_scheduling)
    settings = ServerSettings(
        model_names=args.served_model_name or [default_model_name(model)],
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        unauthenticated_endpoints=tuple(args.unauthenticated_endpoints),
        enable_docs=args.enable_docs,
        max_waiting_requests=args.max_waiting_requests,
        max_request_body_bytes=args.max_request_body_bytes,
        limits=RequestLimits(args.max_samples_per_request, args.trust_request_chat_template),
        shutdown_timeout=args.shutdown_timeout,
        log_level=args.uvicorn_log_level,
        engine_kwargs=kwargs,
    )
    logging.getLogger("compiled_llm").setLevel(logging.INFO)
    return asyncio.run(serve(settings))
