"""Llama 3.x JSON tool calls: the response is `{"name": ..., "parameters": {...}}` (after an
optional `<|python_tag|>`), several separated by `;`."""

from __future__ import annotations

from compiled_llm.server.tool_parsers.base import CallProgress, ToolCall, ToolParser, scan_calls

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    args_keys = ("parameters", "arguments")

    def start(self, text: str) -> int:
        stripped = text.lstrip()
        if stripped.startswith(PYTHON_TAG) or stripped.startswith("{"):
            return len(text) - len(stripped)
        return -1

    def holdback(self, text: str) -> int:
        stripped = text.lstrip()
        return len(text) if PYTHON_TAG.startswith(stripped) else 0

    def progress(
        self, section: str, finished: bool
    ) -> tuple[list[ToolCall] | None, CallProgress | None]:
        text = section.lstrip().removeprefix(PYTHON_TAG)
        return scan_calls(text, 0, self.args_keys, " \t\r\n;", finished)
