"""Tool-call parsers by name (vLLM's `--tool-call-parser`): they find tool calls in a model's
text, whole (`extract`) or as it streams (`ToolCallStream`)."""

from __future__ import annotations

import importlib

from compiled_llm.server.tool_parsers.base import (
    CallDeltas,
    CallProgress,
    ToolCall,
    ToolCallStream,
    ToolParser,
)

_PARSERS = {  # name -> "module:Class", imported when chosen
    "hermes": "compiled_llm.server.tool_parsers.hermes:HermesToolParser",
    "llama3_json": "compiled_llm.server.tool_parsers.llama3_json:Llama3JsonToolParser",
}


def tool_parser_names() -> tuple[str, ...]:
    return tuple(_PARSERS)


def get_tool_parser(name: str) -> ToolParser:
    if name not in _PARSERS:
        raise ValueError(f"tool_call_parser must be one of {', '.join(_PARSERS)}, got {name!r}")
    module, cls = _PARSERS[name].split(":")
    parser: ToolParser = getattr(importlib.import_module(module), cls)()
    return parser


__all__ = [
    "CallDeltas",
    "CallProgress",
    "ToolCall",
    "ToolCallStream",
    "ToolParser",
    "get_tool_parser",
    "tool_parser_names",
]
