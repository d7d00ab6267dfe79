"""`tools` and `tool_choice` in chat completions: which mode a request runs in, the grammar
that enforces `required` and named choices, and the tool calls read back from the output.

- none: tools go to the chat template, the output is plain content.
- auto: the server's `--tool-call-parser` finds calls in the output (needs
  `--enable-auto-tool-choice`).
- required: the output is forced to a JSON array of {"name", "parameters"} objects, one of the
  tools each with arguments valid for its schema; it always parses.
- named ({"type": "function", "function": {"name": ...}}): the output is forced to that tool's
  arguments.
parallel_tool_calls false: a required choice's array is held to one call by its grammar; an
auto choice keeps the first call the parser finds (later ones are dropped, as in vLLM).
Any tool call made ends the choice with finish_reason "tool_calls", except a named choice's,
which ends with "stop" (OpenAI's answer to a forced function).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from compiled_llm.sampling_params import StructuredOutputsParams
from compiled_llm.server.tool_parsers import CallProgress, ToolCall, ToolParser
from compiled_llm.server.tool_parsers.base import scan_calls, skip_ws
from compiled_llm.structured_output.validate import validate_structured_outputs

if TYPE_CHECKING:
    from compiled_llm.server.protocol import ChatCompletionRequest


class ToolChoiceError(ValueError):
    def __init__(self, param: str, why: str) -> None:
        super().__init__(f"{param}: {why}")
        self.param = param


@dataclass(frozen=True)
class ToolMode:
    kind: str  # "none" | "auto" | "required" | "named"
    named: str | None = None  # the function of a named choice
    grammar: tuple[StructuredOutputsParams, str] | None = None  # constraint, field it came from
    parallel: bool = True  # parallel_tool_calls: false keeps a choice to one call


def _parameters(tool: Any) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object", "properties": {}}


def resolve(req: ChatCompletionRequest, parser: ToolParser | None) -> ToolMode:
    """The request's tool mode; ToolChoiceError naming the field for a choice it cannot have."""
    tools = req.tools or []
    choice = req.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise ToolChoiceError("tool_choice", "needs tools")
        return ToolMode("none")
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise ToolChoiceError("tools", "function names must be unique")
    if choice == "none":
        return ToolMode("none")
    if choice is None or choice == "auto":
        if parser is None:
            raise ToolChoiceError(
                "tool_choice",
                '"auto" needs a server started with --enable-auto-tool-choice and '
                "--tool-call-parser",
            )
        return ToolMode("auto", parallel=req.parallel_tool_calls is not False)
    if req.structured() is not None:
        raise ToolChoiceError(
            "tool_choice",
            "a required or named tool choice cannot be combined with an output format",
        )
    for i, tool in enumerate(tools):  # each schema is enforced: check it where it was given
        params = StructuredOutputsParams(json=_parameters(tool))
        validate_structured_outputs(params, f"tools.{i}.function.parameters")
    if choice == "required":
        one = req.parallel_tool_calls is False
        schema = {
            "type": "array",
            "minItems": 1,
            **({"maxItems": 1} if one else {}),
            "items": {
                "anyOf": [
                    {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string", "enum": [t.function.name]},
                            "parameters": _parameters(t),
                        },
                        "required": ["name", "parameters"],
                    }
                    for t in tools
                ]
            },
        }
        return ToolMode("required", grammar=(_compact(schema), "tools"), parallel=not one)
    assert not isinstance(choice, str)
    name = choice.function.name
    if name not in names:
        raise ToolChoiceError("tool_choice", f"names the function {name!r}, which is not in tools")
    tool = tools[names.index(name)]
    return ToolMode("named", named=name, grammar=(_compact(_parameters(tool)), "tools"))


def _compact(schema: dict[str, Any]) -> StructuredOutputsParams:
    """Forced tool calls are parsed by the server, never shown as written: compact JSON, with no
    whitespace for a small model to wander in."""
    return StructuredOutputsParams(json=schema, disable_any_whitespace=True)


def forced_progress(
    mode: ToolMode, text: str, finished: bool
) -> tuple[list[ToolCall] | None, CallProgress | None]:
    """A required or named choice's calls so far: (the complete ones, None if the finished
    output is cut short; the call being written). Arguments are the text as generated (compact
    JSON: the grammar allows no whitespace), so streamed fragments add up to them."""
    if finished:
        try:
            json.loads(text)
        except ValueError:
            return None, None
    if mode.kind == "named":
        assert mode.named is not None
        if finished:
            return [ToolCall(mode.named, text)], None
        return [], CallProgress(mode.named, text)
    start = skip_ws(text, 0)
    if start == len(text):
        return (None if finished else []), None
    if text[start] != "[":
        return None, None
    return scan_calls(text, start + 1, ("parameters",), " \t\r\n,", finished, close="]")


def forced_calls(mode: ToolMode, text: str) -> list[ToolCall] | None:
    """The calls of a finished required or named choice (None if the output is cut short)."""
    return forced_progress(mode, text, finished=True)[0]


def template_tools(req: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    """The tools as chat templates expect them."""
    if not req.tools:
        return None
    return [t.model_dump(exclude_none=True) for t in req.tools]
