"""Hermes / Qwen style: each call is `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`."""

from __future__ import annotations

from compiled_llm.server.tool_parsers.base import (
    CallProgress,
    ToolCall,
    ToolParser,
    call_from_text,
    progress_of,
    scan_object,
    skip_ws,
)

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    args_keys = ("arguments", "parameters")

    def start(self, text: str) -> int:
        return text.find(OPEN)

    def holdback(self, text: str) -> int:
        for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
            if OPEN.startswith(text[-n:]):
                return n
        return 0

    def progress(
        self, section: str, finished: bool
    ) -> tuple[list[ToolCall] | None, CallProgress | None]:
        calls: list[ToolCall] = []
        pos = 0
        while True:  # text between and after the blocks is left out
            pos = section.find(OPEN, pos)
            if pos < 0:
                return calls, None
            body = pos + len(OPEN)
            close = section.find(CLOSE, body)
            if close < 0 and not finished:  # the call being written
                start = skip_ws(section, body)
                return calls, progress_of(section, start, self.args_keys)
            end = len(section) if close < 0 else close
            start = skip_ws(section, body)
            scan = scan_object(section, start)
            call = None
            if scan.end is not None and not section[scan.end : end].strip():
                call = call_from_text(section, start, scan.end, self.args_keys)
            if call is None:
                return (None if finished else calls), None
            calls.append(call)
            if close < 0:
                return calls, None
            pos = close + len(CLOSE)
