"""A chat choice's output as the OpenAI API shows it: reasoning split off (a reasoning parser),
tool calls read (a tool-call parser, or the JSON a required/named tool choice forced), the rest
content; whole, or as stream deltas."""

from __future__ import annotations

from typing import Any

from compiled_llm.outputs import CompletionOutput
from compiled_llm.server.reasoning_parsers import ReasoningParser
from compiled_llm.server.tool_parsers import CallDeltas, ToolCall, ToolCallStream, ToolParser
from compiled_llm.server.tool_parsers.base import progress_list
from compiled_llm.server.tools import ToolMode, forced_calls, forced_progress


class ChatOutput:
    """How one request's choices are read (the same for each of its `n` choices)."""

    def __init__(
        self, mode: ToolMode, tool_parser: ToolParser | None, reasoning: ReasoningParser | None
    ) -> None:
        self.mode = mode
        self.tool_parser = tool_parser if mode.kind == "auto" else None
        self.reasoning = reasoning

    @property
    def forced(self) -> bool:
        return self.mode.kind in ("required", "named")

    def message(self, c: CompletionOutput) -> tuple[dict[str, Any], str | None]:
        """The whole choice: (message, finish_reason)."""
        reasoning, text = self.reasoning.split(c.text) if self.reasoning else (None, c.text)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        calls: list[ToolCall] = []
        if self.forced and c.finish_reason == "stop":
            calls = forced_calls(self.mode, text) or []
            if calls:
                message["content"] = None
        elif self.tool_parser is not None:
            message["content"], calls = self.tool_parser.extract(text)
            calls = calls if self.mode.parallel else calls[:1]
        if calls:
            message["tool_calls"] = [call.to_openai() for call in calls]
        return message, self.finish_reason(c, bool(calls))

    def finish_reason(self, c: CompletionOutput, called: bool) -> str | None:
        """ "tool_calls" once a tool was called, except for a named choice, which ends with the
        output's own reason ("stop"), as OpenAI and vLLM answer a forced function."""
        if called and self.mode.kind != "named":
            return "tool_calls"
        return c.finish_reason

    def stream(self) -> ChoiceStream:
        return ChoiceStream(self)


class ChoiceStream:
    """Deltas of one streamed choice: reasoning and content as they grow; each tool call's
    header (index, id, type, name) once its name is written, then its arguments text as it
    grows (a forced choice's too)."""

    def __init__(self, output: ChatOutput) -> None:
        self.output = output
        self.reasoning_sent = 0
        limit = None if output.mode.parallel else 1
        self.tools = ToolCallStream(output.tool_parser, limit) if output.tool_parser else None
        self.forced = CallDeltas()
        self.content_sent = 0

    def delta(self, c: CompletionOutput) -> tuple[dict[str, Any], str | None]:
        """(delta, finish_reason) for the choice's output so far."""
        out = self.output
        finished = c.finish_reason is not None
        if out.reasoning is not None:
            reasoning, text = out.reasoning.split(c.text, finished)
        else:
            reasoning, text = None, c.text
        delta: dict[str, Any] = {}
        if reasoning is not None and len(reasoning) > self.reasoning_sent:
            delta["reasoning_content"] = reasoning[self.reasoning_sent :]
            self.reasoning_sent = len(reasoning)
        tool_calls: list[dict[str, Any]] = []
        called = False
        if out.forced:
            calls, pending = forced_progress(out.mode, text, finished and c.finish_reason == "stop")
            if finished and (calls is None or c.finish_reason != "stop"):
                # cut short (max_tokens): what was made, as content, unless calls were sent
                if self.forced.num_calls == 0:
                    delta["content"] = text
                else:  # the rest of the arguments made, as for a call still being written
                    calls, pending = forced_progress(out.mode, text, False)
                    tool_calls = self.forced.update(progress_list(calls or [], pending))
            else:
                tool_calls = self.forced.update(progress_list(calls or [], pending))
                called = finished and self.forced.num_calls > 0
        elif self.tools is not None:
            content, tool_calls = self.tools.feed(text, finished)
            if content:
                delta["content"] = content
            called = finished and self.tools.calls.num_calls > 0
        elif len(text) > self.content_sent:
            delta["content"] = text[self.content_sent :]
            self.content_sent = len(text)
        if tool_calls:
            delta["tool_calls"] = tool_calls
        return delta, out.finish_reason(c, called)
