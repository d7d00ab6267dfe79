"""The server's own settings (the engine's are EngineArgs), kept free of heavy imports so the
command line can read their defaults without loading FastAPI or torch."""

from __future__ import annotations

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
    """How chat completions read tool calls and reasoning out of the model's text."""

    enable_auto_tool_choice: bool = False  # tool_choice "auto" (needs tool_call_parser)
    tool_call_parser: str | None = None  # a name of server/tool_parsers
    reasoning_parser: str | None = None  # a name of server/reasoning_parsers

    def __post_init__(self) -> None:
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")


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
    shutdown_timeout: float = 10.0
    log_level: str = "info"
    access_log: bool = True  # uvicorn's line per request; on by default, as in vLLM
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
