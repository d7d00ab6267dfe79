"""Hermes / Qwen style: each call is `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`."""

from __future__ import annotations

import json
import re

from compiled_llm.server.tool_parsers.base import ToolCall, ToolParser, call_from_object

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)


class HermesToolParser(ToolParser):
    def start(self, text: str) -> int:
        return text.find(OPEN)

    def holdback(self, text: str) -> int:
        for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
            if OPEN.startswith(text[-n:]):
                return n
        return 0

    def calls(self, section: str, finished: bool) -> list[ToolCall] | None:
        bodies = _BLOCK.findall(section)
        if finished:  # a model may stop before closing its last call
            tail = section[section.rfind(CLOSE) + len(CLOSE) :] if CLOSE in section else section
            if tail.strip().startswith(OPEN):
                bodies.append(tail.strip()[len(OPEN) :])
        calls = []
        for body in bodies:
            try:
                call = call_from_object(json.loads(body), ("arguments", "parameters"))
            except ValueError:
                call = None
            if call is None:
                if finished:
                    return None
                break
            calls.append(call)
        return calls
