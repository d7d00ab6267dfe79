"""Llama 3.x JSON tool calls: the response is `{"name": ..., "parameters": {...}}` (after an
optional `<|python_tag|>`), several separated by `;`."""

from __future__ import annotations

import json

from compiled_llm.server.tool_parsers.base import ToolCall, ToolParser, call_from_object

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    def start(self, text: str) -> int:
        stripped = text.lstrip()
        if stripped.startswith(PYTHON_TAG) or stripped.startswith("{"):
            return len(text) - len(stripped)
        return -1

    def holdback(self, text: str) -> int:
        stripped = text.lstrip()
        return len(text) if PYTHON_TAG.startswith(stripped) else 0

    def calls(self, section: str, finished: bool) -> list[ToolCall] | None:
        text = section.lstrip().removeprefix(PYTHON_TAG)
        decoder = json.JSONDecoder()
        calls: list[ToolCall] = []
        pos = 0
        while True:
            while pos < len(text) and text[pos] in " \t\r\n;":
                pos += 1
            if pos == len(text):
                return calls
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except ValueError:
                return None if finished else calls  # the last object is still being written
            call = call_from_object(obj, ("parameters", "arguments"))
            if call is None:
                return None
            calls.append(call)
