"""What every tool-call parser provides, and the streaming wrapper they share."""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


def tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as the OpenAI API carries it
    id: str = field(default_factory=tool_call_id)

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        call: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return call if index is None else {"index": index, **call}


def call_from_object(obj: Any, args_keys: tuple[str, ...]) -> ToolCall | None:
    """A ToolCall from {"name": ..., <args key>: {...}}; None if `obj` is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args: Any = next((obj[k] for k in args_keys if k in obj), {})
    if isinstance(args, str):  # some models send the arguments already as JSON text
        return ToolCall(obj["name"], args)
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class ToolParser(ABC):
    @abstractmethod
    def start(self, text: str) -> int:
        """Where the tool-call section begins in `text`, or -1 while it has not."""

    @abstractmethod
    def holdback(self, text: str) -> int:
        """How many trailing characters of `text` (no section yet) may begin one, and so must
        not be streamed as content yet."""

    @abstractmethod
    def calls(self, section: str, finished: bool) -> list[ToolCall] | None:
        """The complete calls in the section so far (all of it once `finished`); None when the
        finished section is not tool calls after all (then it is content)."""

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a whole response; content is None when empty."""
        start = self.start(text)
        if start < 0:
            return text, []
        calls = self.calls(text[start:], finished=True)
        if not calls:
            return text, []
        return text[:start].strip() or None, calls


class ToolCallStream:
    """Turns one choice's growing text into content deltas and newly completed tool calls."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.sent = 0  # characters sent as content
        self.num_calls = 0
        self.ids: list[str] = []

    def feed(self, text: str, finished: bool) -> tuple[str, list[ToolCall]]:
        start = self.parser.start(text)
        if start < 0:
            end = len(text) if finished else len(text) - self.parser.holdback(text)
            delta, self.sent = text[self.sent : max(end, self.sent)], max(end, self.sent)
            return delta, []
        delta, self.sent = text[self.sent : max(start, self.sent)], max(start, self.sent)
        calls = self.parser.calls(text[start:], finished) or []
        if finished and not calls and self.num_calls == 0:  # not tool calls after all
            rest, self.sent = text[self.sent :], len(text)
            return delta + rest, []
        new = calls[self.num_calls :]
        self.num_calls = len(calls)
        return delta, new
