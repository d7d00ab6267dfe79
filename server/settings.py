"""The server's own settings (the engine's are EngineArgs), kept free of heavy imports so the
command line can read their defaults without loading FastAPI or torch."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

UNAUTHENTICATED_CHOICES = ("/metrics", "/version")  # /health never needs the key


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask of the server."""

    max_samples_per_request: int = 256  # prompts x n
    trust_request_chat_template: bool = False


@dataclass(frozen=True)
class ChatSettings:
    """How chat prompts are rendered (the server's template, if not the tokenizer's) and how
    tool calls and reasoning are read out of the model's text."""

    enable_auto_tool_choice: bool = False  # tool_choice "auto" (needs tool_call_parser)
    tool_call_parser: str | None = None  # a name of server/tool_parsers
    reasoning_parser: str | None = None  # a name of server/reasoning_parsers
    chat_template: str | None = None  # Jinja text (--chat-template), instead of the tokenizer's

    def __post_init__(self) -> None:
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")


@dataclass(frozen=True)
class CORSSettings:
    """Cross-origin requests from browsers (vLLM's flags and defaults: every origin, method
    and header; no credentials)."""

    allowed_origins: tuple[str, ...] = ("*",)
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False


@dataclass
class ServerSettings:
    model_names: list[str]
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    unauthenticated_endpoints: tuple[str, ...] = ()  # of UNAUTHENTICATED_CHOICES
    enable_docs: bool = False
    max_waiting_requests: int | None = None
    max_request_body_bytes: int = 4 << 20
    limits: RequestLimits = field(default_factory=RequestLimits)
    chat: ChatSettings = field(default_factory=ChatSettings)
    cors: CORSSettings = field(default_factory=CORSSettings)
    shutdown_timeout: float = 10.0
    log_level: str = "info"
    access_log: bool = True  # uvicorn's line per request; on by default, as in vLLM
    engine_kwargs: dict[str, Any] = field(default_factory=dict)


def read_chat_template(value: str) -> str:
    """--chat-template's value: a file's text, or the template itself (vLLM's rule: a value
    that is not a file but holds Jinja's delimiters is the template); ValueError otherwise."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            template = f.read()
    elif any(mark in value for mark in ("{{", "{%")):
        template = value
    else:
        raise ValueError(f"--chat-template: {value!r} is neither a file nor a Jinja template")
    import jinja2  # transformers renders templates with it

    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"--chat-template: {e} (line {e.lineno})") from None
    return template
