"""`compiled-llm serve [MODEL]`: the OpenAI-compatible server, with vLLM's flag names."""

from __future__ import annotations

import argparse
import asyncio
import os

from compiled_llm.cli.args import (
    add_engine_args,
    at_least,
    engine_kwargs,
    json_strings,
    usage_errors,
)
from compiled_llm.config import EngineArgs
from compiled_llm.envs import Envs
from compiled_llm.server.reasoning_parsers import reasoning_parser_names
from compiled_llm.server.settings import (
    UNAUTHENTICATED_CHOICES,
    ChatSettings,
    CORSSettings,
    RequestLimits,
    ServerSettings,
    read_chat_template,
)
from compiled_llm.server.tool_parsers import tool_parser_names


def port(text: str) -> int:
    """An argparse type: a TCP port, 1-65535."""
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port in 1-65535, got {value}")
    return value


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the OpenAI-compatible HTTP server",
        description="Run the OpenAI-compatible HTTP server (vLLM's flag names).",
    )
    g = p.add_argument_group("server")
    g.add_argument("--host", default=ServerSettings.host, help="(default: %(default)s)")
    g.add_argument("--port", type=port, default=ServerSettings.port, help="(default: %(default)s)")
    g.add_argument(
        "--api-key",
        default=None,
        help="require `Authorization: Bearer KEY` on every endpoint but /health (default: "
        "$COMPILED_LLM_API_KEY, else no key)",
    )
    g.add_argument(
        "--unauthenticated-endpoints",
        nargs="*",
        choices=UNAUTHENTICATED_CHOICES,
        default=[],
        help="endpoints that stay open with --api-key (e.g. /metrics for a scraper); /health "
        "is always open (default: none)",
    )
    g.add_argument(
        "--enable-docs", action="store_true", help="serve /docs and /openapi.json (default: off)"
    )
    g.add_argument(
        "--max-request-body-bytes",
        type=at_least(1),
        default=ServerSettings.max_request_body_bytes,
        help="larger request bodies are answered 413 (default: %(default)s)",
    )
    g.add_argument(
        "--max-samples-per-request",
        type=at_least(1),
        default=RequestLimits.max_samples_per_request,
        help="cap on prompts x n in one request (default: %(default)s)",
    )
    g.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="accept chat templates sent in requests (chat_template); refused by default",
    )
    for name, help in (
        ("origins", "CORS: origins (web pages) that may call the server from a browser"),
        ("methods", "CORS: HTTP methods such calls may use"),
        ("headers", "CORS: request headers such calls may send"),
    ):
        g.add_argument(
            f"--allowed-{name}",
            type=json_strings,
            default=list(getattr(CORSSettings, f"allowed_{name}")),
            metavar="JSON",
            help=f"{help}, a JSON list (vLLM's flag; default: %(default)s)",
        )
    g.add_argument(
        "--allow-credentials",
        action="store_true",
        help="CORS: let browsers send credentials (cookies) cross-origin (default: off)",
    )
    g.add_argument(
        "--chat-template",
        default=None,
        metavar="PATH|TEMPLATE",
        help="the chat template (a Jinja file, or the template itself) to render chat prompts "
        "with instead of the tokenizer's, as vLLM's flag (default: the tokenizer's)",
    )
    g.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='tool_choice "auto": read tool calls out of the model\'s text with '
        "--tool-call-parser (default: off; required and named tool choices always work)",
    )
    g.add_argument(
        "--tool-call-parser",
        choices=tool_parser_names(),
        default=None,
        help="how the model writes tool calls: hermes (Qwen, Hermes: <tool_call> JSON), "
        "llama3_json (Llama 3.x JSON) (default: none)",
    )
    g.add_argument(
        "--reasoning-parser",
        choices=reasoning_parser_names(),
        default=None,
        help="split <think>...</think> into reasoning_content: qwen3, deepseek_r1 (default: none)",
    )
    g.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="model name(s) clients use; the first is reported (default: the model's name)",
    )
    g.add_argument(
        "--max-waiting-requests",
        type=at_least(1),
        default=None,
        help="answer 503 while more requests than this wait for their first token (default: "
        "no limit)",
    )
    g.add_argument(
        "--shutdown-timeout",
        type=float,
        default=ServerSettings.shutdown_timeout,
        help="seconds in-flight requests may finish after SIGTERM before they are aborted "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--uvicorn-log-level",
        default=ServerSettings.log_level,
        choices=("critical", "error", "warning", "info", "debug", "trace"),
        help="(default: %(default)s)",
    )
    g.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=ServerSettings.access_log,
        help="log one line per HTTP request, as vLLM does (default: on)",
    )
    g.add_argument(
        "--disable-uvicorn-access-log",
        dest="access_log",
        action="store_false",
        help="vLLM's name for --no-access-log",
    )
    add_engine_args(p, model_positional=True)
    p.set_defaults(func=_serve, parser=p)


def default_model_name(model: str | None) -> str:
    from compiled_llm.models.loader import resolve_model

    path = resolve_model(model).rstrip("/")
    name = os.path.basename(path)
    return name.split(".")[0] if name.endswith(".gguf") else name


def _serve(args: argparse.Namespace) -> int:
    from compiled_llm.server.api_server import serve

    with usage_errors(args):  # everything is checked before the port is bound
        kwargs = engine_kwargs(args)
        EngineArgs.from_kwargs(**kwargs)
        chat = ChatSettings(
            enable_auto_tool_choice=args.enable_auto_tool_choice,
            tool_call_parser=args.tool_call_parser,
            reasoning_parser=args.reasoning_parser,
            chat_template=read_chat_template(args.chat_template) if args.chat_template else None,
        )
    settings = ServerSettings(
        model_names=args.served_model_name or [default_model_name(kwargs["model"])],
        host=args.host,
        port=args.port,
        api_key=args.api_key or Envs.read().api_key,
        unauthenticated_endpoints=tuple(args.unauthenticated_endpoints),
        enable_docs=args.enable_docs,
        max_waiting_requests=args.max_waiting_requests,
        max_request_body_bytes=args.max_request_body_bytes,
        limits=RequestLimits(args.max_samples_per_request, args.trust_request_chat_template),
        chat=chat,
        cors=CORSSettings(
            allowed_origins=tuple(args.allowed_origins),
            allowed_methods=tuple(args.allowed_methods),
            allowed_headers=tuple(args.allowed_headers),
            allow_credentials=args.allow_credentials,
        ),
        shutdown_timeout=args.shutdown_timeout,
        log_level=args.uvicorn_log_level,
        access_log=args.access_log,
        engine_kwargs=kwargs,
    )
    return asyncio.run(serve(settings))
