"""`compiled-llm serve [MODEL]`: the OpenAI-compatible server, with vLLM's flag names."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

from compiled_llm.cli import add_engine_args, engine_kwargs


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
    from compiled_llm.server.api_server import ServerSettings, serve

    if args.model and args.model_flag and args.model != args.model_flag:
        raise ValueError("give the model once: positional MODEL or --model")
    model = args.model or args.model_flag
    if args.max_waiting_requests is not None and args.max_waiting_requests < 1:
        raise ValueError("--max-waiting-requests must be at least 1")
    kwargs = dict(engine_kwargs(args), model=model, async_scheduling=args.async_scheduling)
    settings = ServerSettings(
        model_names=args.served_model_name or [default_model_name(model)],
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_waiting_requests=args.max_waiting_requests,
        shutdown_timeout=args.shutdown_timeout,
        log_level=args.uvicorn_log_level,
        engine_kwargs=kwargs,
    )
    logging.getLogger("compiled_llm").setLevel(logging.INFO)
    return asyncio.run(serve(settings))
