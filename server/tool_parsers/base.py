"""What every tool-call parser provides, and the streaming wrapper they share.

A call's `arguments` is the raw JSON text of its arguments value as the model wrote it (not
re-serialized), so a stream can send it as it grows: the concatenated fragments of a streamed
call equal the whole response's `arguments` exactly."""

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


@dataclass(frozen=True)
class CallProgress:
    """A call as far as it is written: its name (once its string is complete) and a prefix of
    its final `arguments` (all of it once the call is complete)."""

    name: str
    arguments: str


# --- a small scanner for a JSON object that may still be being written ----------------------
_WS = " \t\r\n"


def skip_ws(text: str, i: int, chars: str = _WS) -> int:
    while i < len(text) and text[i] in chars:
        i += 1
    return i


def _string_end(text: str, i: int) -> int | None:
    """End (after the closing quote) of the JSON string opening at text[i]; None while open."""
    j = i + 1
    while j < len(text):
        if text[j] == "\\":
            j += 2
        elif text[j] == '"':
            return j + 1
        else:
            j += 1
    return None


def _value_end(text: str, i: int) -> int | None:
    """End of the JSON value beginning at text[i]; None while it may still grow."""
    if text[i] == '"':
        return _string_end(text, i)
    if text[i] in "{[":
        depth, j = 0, i
        while j < len(text):
            c = text[j]
            if c == '"':
                end = _string_end(text, j)
                if end is None:
                    return None
                j = end
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    j = i  # a number or literal: it ends where a delimiter begins
    while j < len(text) and text[j] not in _WS + ",}]":
        j += 1
    return j if j < len(text) else None


@dataclass
class ObjectScan:
    """Where an object's top-level values lie (value end None while still open); `end` after
    its closing brace once complete; `ok` False once the text cannot be an object of keys."""

    spans: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    name: str | None = None
    end: int | None = None
    ok: bool = True


def scan_object(text: str, pos: int) -> ObjectScan:
    """Scan the (possibly unfinished) JSON object opening at text[pos]. Only the structure is
    checked; a complete object is still parsed with json before it counts."""
    scan = ObjectScan()
    if pos >= len(text) or text[pos] != "{":
        scan.ok = False
        return scan
    i = skip_ws(text, pos + 1)
    while i < len(text):
        if text[i] == "}":
            scan.end = i + 1
            return scan
        if text[i] == ",":
            i = skip_ws(text, i + 1)
            continue
        if text[i] != '"':
            scan.ok = False
            return scan
        key_end = _string_end(text, i)
        if key_end is None:
            return scan
        try:
            key = json.loads(text[i:key_end])
        except ValueError:
            scan.ok = False
            return scan
        i = skip_ws(text, key_end)
        if i == len(text):
            return scan
        if text[i] != ":":
            scan.ok = False
            return scan
        i = skip_ws(text, i + 1)
        if i == len(text):
            return scan
        value_end = _value_end(text, i)
        scan.spans[key] = (i, value_end)
        if value_end is None:
            return scan
        if key == "name":
            try:
                name = json.loads(text[i:value_end])
            except ValueError:
                name = None
            scan.name = name if isinstance(name, str) else None
        i = skip_ws(text, value_end)
    return scan


def _args_key(scan: ObjectScan, args_keys: tuple[str, ...]) -> str | None:
    return next((k for k in args_keys if k in scan.spans), None)


def call_from_text(text: str, start: int, end: int, args_keys: tuple[str, ...]) -> ToolCall | None:
    """The call written as the JSON object text[start:end] ({"name": ..., <args key>: {...}});
    None if it is not one. Its arguments are the value's text as written (a string value is
    taken as arguments already in JSON text, as some models send them)."""
    try:
        obj = json.loads(text[start:end])
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    scan = scan_object(text, start)
    key = _args_key(scan, args_keys)
    if key is None or key not in obj:
        return ToolCall(obj["name"], "{}")
    if isinstance(obj[key], str):
        return ToolCall(obj["name"], obj[key])
    value_start, value_end = scan.spans[key]
    return ToolCall(obj["name"], text[value_start:value_end])


def progress_of(text: str, start: int, args_keys: tuple[str, ...]) -> CallProgress | None:
    """The unfinished call object opening at text[start], once its name is known: the
    arguments so far when they are an object (a string value is sent when complete)."""
    scan = scan_object(text, start)
    if not scan.ok or scan.name is None:
        return None
    key = _args_key(scan, args_keys)
    if key is None:
        return CallProgress(scan.name, "")
    value_start, value_end = scan.spans[key]
    if text[value_start] != "{":
        return CallProgress(scan.name, "")
    return CallProgress(scan.name, text[value_start : value_end or len(text)])


def scan_calls(
    text: str, pos: int, args_keys: tuple[str, ...], seps: str, finished: bool, close: str = ""
) -> tuple[list[ToolCall] | None, CallProgress | None]:
    """Call objects from text[pos:] separated by any of `seps` (ending at `close`, if given):
    (the complete calls, or None when the text is not calls; the call being written)."""
    calls: list[ToolCall] = []
    while True:
        pos = skip_ws(text, pos, seps)
        if pos == len(text) or (close and text[pos] == close):
            if finished and close and pos == len(text):
                return None, None  # the list was never closed
            return calls, None
        scan = scan_object(text, pos)
        if scan.end is None:
            if finished or not scan.ok:
                return None, None
            return calls, progress_of(text, pos, args_keys)
        call = call_from_text(text, pos, scan.end, args_keys)
        if call is None:
            return None, None
        calls.append(call)
        pos = scan.end


class ToolParser(ABC):
    args_keys: tuple[str, ...] = ("arguments", "parameters")

    @abstractmethod
    def start(self, text: str) -> int:
        """Where the tool-call section begins in `text`, or -1 while it has not."""

    @abstractmethod
    def holdback(self, text: str) -> int:
        """How many trailing characters of `text` (no section yet) may begin one, and so must
        not be streamed as content yet."""

    @abstractmethod
    def progress(
        self, section: str, finished: bool
    ) -> tuple[list[ToolCall] | None, CallProgress | None]:
        """(the complete calls in the section so far (all of it once `finished`), or None when
        the finished section is not tool calls after all (then it is content); the call being
        written after them, once its name is known, or None)."""

    def calls(self, section: str, finished: bool) -> list[ToolCall] | None:
        return self.progress(section, finished)[0]

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a whole response; content is None when empty."""
        start = self.start(text)
        if start < 0:
            return text, []
        calls = self.calls(text[start:], finished=True)
        if not calls:
            return text, []
        return text[:start].strip() or None, calls


class CallDeltas:
    """Turns the calls of a choice as far as they are written into `delta.tool_calls` entries
    in OpenAI's streamed shape: a call's first entry has its index, id, type and name (arguments
    ""); later ones only the index and the next fragment of the arguments text."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit  # most calls sent (parallel_tool_calls false: 1)
        self.ids: list[str] = []
        self.sent: list[str] = []  # the arguments sent per call

    @property
    def num_calls(self) -> int:
        return len(self.ids)

    def update(self, calls: list[CallProgress]) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        for index, call in enumerate(calls[: self.limit]):
            if index == len(self.ids):
                self.ids.append(tool_call_id())
                self.sent.append("")
                head = {"name": call.name, "arguments": ""}
                deltas.append(
                    {"index": index, "id": self.ids[index], "type": "function", "function": head}
                )
            sent = self.sent[index]
            # the text only grows, so what was sent is a prefix of what is written now
            if len(call.arguments) > len(sent) and call.arguments.startswith(sent):
                deltas.append(
                    {"index": index, "function": {"arguments": call.arguments[len(sent) :]}}
                )
                self.sent[index] = call.arguments
        return deltas


def progress_list(calls: list[ToolCall], pending: CallProgress | None) -> list[CallProgress]:
    done = [CallProgress(c.name, c.arguments) for c in calls]
    return done if pending is None else [*done, pending]


class ToolCallStream:
    """Turns one choice's growing text (auto tool choice) into content deltas and tool-call
    delta entries."""

    def __init__(self, parser: ToolParser, limit: int | None = None) -> None:
        self.parser = parser
        self.sent = 0  # characters sent as content
        self.calls = CallDeltas(limit)

    def feed(self, text: str, finished: bool) -> tuple[str, list[dict[str, Any]]]:
        start = self.parser.start(text)
        if start < 0:
            end = len(text) if finished else len(text) - self.parser.holdback(text)
            delta, self.sent = text[self.sent : max(end, self.sent)], max(end, self.sent)
            return delta, []
        delta, self.sent = text[self.sent : max(start, self.sent)], max(start, self.sent)
        calls, pending = self.parser.progress(text[start:], finished)
        if finished and not calls and self.calls.num_calls == 0:  # not tool calls after all
            rest, self.sent = text[self.sent :], len(text)
            return delta + rest, []
        return delta, self.calls.update(progress_list(calls or [], pending))
