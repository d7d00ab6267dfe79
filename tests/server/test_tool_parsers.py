"""Tool-call and reasoning parsers on fixed text (no model): whole and streamed in pieces, the
streamed result must equal the whole one."""

from __future__ import annotations

import json

import pytest

from compiled_llm.outputs import CompletionOutput
from compiled_llm.server.chat_output import ChatOutput
from compiled_llm.server.protocol import ChatCompletionRequest, ChatMessage
from compiled_llm.server.reasoning_parsers import get_reasoning_parser
from compiled_llm.server.tool_parsers import ToolCallStream, get_tool_parser
from compiled_llm.server.tools import ToolChoiceError, ToolMode, forced_calls, resolve

WEATHER = {"city": "Paris", "unit": "celsius"}
HERMES = (
    "Let me check. <tool_call>\n"
    + json.dumps({"name": "get_weather", "arguments": WEATHER})
    + "\n</tool_call>\n<tool_call>\n"
    + json.dumps({"name": "get_time", "arguments": {}})
    + "\n</tool_call>"
)
LLAMA = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; {"name": "get_time", "parameters": {}}'


def streamed(parser_name: str, text: str, step: int) -> tuple[str, list]:
    stream = ToolCallStream(get_tool_parser(parser_name))
    content, calls = "", []
    for end in [*range(step, len(text), step), len(text)]:
        delta, new = stream.feed(text[:end], finished=end == len(text))
        content += delta
        calls += new
    return content, calls


@pytest.mark.parametrize(
    "name,text,content", [("hermes", HERMES, "Let me check."), ("llama3_json", LLAMA, None)]
)
@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_calls_whole_and_streamed(name: str, text: str, content: str | None, step: int) -> None:
    parser = get_tool_parser(name)
    got_content, calls = parser.extract(text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", WEATHER),
        ("get_time", {}),
    ]
    stream_content, stream_calls = streamed(name, text, step)
    assert stream_content.strip() == (content or "")
    assert [(c.name, c.arguments) for c in stream_calls] == [(c.name, c.arguments) for c in calls]


@pytest.mark.parametrize("name", ["hermes", "llama3_json"])
@pytest.mark.parametrize(
    "text",
    ["Just an answer, no tools.", "<tool_call>{not json}</tool_call>", "{not a call}", "<tool_"],
)
def test_text_without_valid_calls_is_content(name: str, text: str) -> None:
    content, calls = get_tool_parser(name).extract(text)
    assert (content, calls) == (text, [])
    assert streamed(name, text, 2) == (text, [])


def test_hermes_unclosed_last_call_at_the_end() -> None:
    text = '<tool_call>{"name": "f", "arguments": {"a": 1}}'
    _, calls = get_tool_parser("hermes").extract(text)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"a": 1})]


@pytest.mark.parametrize(
    "name,text,reasoning,content",
    [
        ("qwen3", "<think>\nsteps\n</think>\n\nThe answer.", "\nsteps\n", "The answer."),
        ("qwen3", "The answer, no thinking.", None, "The answer, no thinking."),
        ("deepseek_r1", "steps</think>The answer.", "steps", "The answer."),
        ("deepseek_r1", "<think>steps</think>The answer.", "steps", "The answer."),
        ("deepseek_r1", "still thinking", "still thinking", ""),
    ],
)
@pytest.mark.parametrize("step", [1, 4, 1000])
def test_reasoning_split_whole_and_streamed(
    name: str, text: str, reasoning: str | None, content: str, step: int
) -> None:
    parser = get_reasoning_parser(name)
    assert parser.split(text) == (reasoning, content)
    output = ChatOutput(ToolMode("none"), None, parser)
    stream = output.stream()
    got_reasoning, got_content = "", ""
    for end in [*range(step, len(text), step), len(text)]:
        finished = end == len(text)
        c = CompletionOutput(0, text[:end], [], None, None, "stop" if finished else None)
        delta, _ = stream.delta(c)
        got_reasoning += delta.get("reasoning_content", "")
        got_content += delta.get("content", "")
    assert (got_reasoning or None, got_content) == (reasoning, content)
    whole, _ = output.message(CompletionOutput(0, text, [], None, None, "stop"))
    assert whole.get("reasoning_content") == reasoning and whole["content"] == content


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "get_time"}},
]


def request(**kw: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS, **kw}
    )


@pytest.mark.parametrize(
    "kw,auto,param",
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, True, "tool_choice"),
        ({"tool_choice": "auto"}, False, "tool_choice"),
        ({}, False, "tool_choice"),  # tools imply auto
        ({"tools": None, "tool_choice": "required"}, True, "tool_choice"),
        ({"tools": [TOOLS[0], TOOLS[0]]}, True, "tools"),
        (
            {"tool_choice": "required", "response_format": {"type": "json_object"}},
            True,
            "tool_choice",
        ),
    ],
)
def test_bad_tool_choices(kw: dict, auto: bool, param: str) -> None:
    with pytest.raises(ToolChoiceError) as info:
        resolve(request(**kw), get_tool_parser("hermes") if auto else None)
    assert info.value.param == param


def test_bad_tool_schema_names_the_tool() -> None:
    bad = {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "integer", "multipleOf": 2}},
    }
    with pytest.raises(ValueError) as info:
        resolve(request(tools=[bad], tool_choice="required"), None)
    assert getattr(info.value, "param", None) == "tools.0.function.parameters.multipleOf"


def test_required_and_named_modes() -> None:
    required = resolve(request(tool_choice="required"), None)
    assert required.kind == "required" and required.grammar is not None
    text = json.dumps([{"name": "get_weather", "parameters": {"city": "Oslo"}}])
    calls = forced_calls(required, text)
    assert calls is not None and (calls[0].name, json.loads(calls[0].arguments)) == (
        "get_weather",
        {"city": "Oslo"},
    )
    named = resolve(
        request(tool_choice={"type": "function", "function": {"name": "get_weather"}}), None
    )
    calls = forced_calls(named, '{"city": "Rome"}')
    assert calls is not None and calls[0].name == "get_weather"
    assert forced_calls(named, '{"city": "Ro') is None  # cut short by max_tokens
    assert resolve(request(tool_choice="none"), None).kind == "none"


def test_tool_messages_reach_the_template() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    assistant = ChatMessage.model_validate(
        {"role": "assistant", "content": None, "tool_calls": [call]}
    )
    tool = ChatMessage.model_validate({"role": "tool", "content": "42", "tool_call_id": "c1"})
    rendered = assistant.to_template()
    assert rendered["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    assert tool.to_template() == {"role": "tool", "content": "42", "tool_call_id": "c1"}


def test_parallel_tool_calls_false_keeps_one_call() -> None:
    """parallel_tool_calls false: a required choice's grammar allows one array item, an auto
    choice keeps the first parsed call, whole and streamed; a named choice ends with "stop"."""
    required = resolve(request(tool_choice="required", parallel_tool_calls=False), None)
    assert required.grammar is not None and required.grammar[0].json["maxItems"] == 1
    assert "maxItems" not in resolve(request(tool_choice="required"), None).grammar[0].json
    hermes = get_tool_parser("hermes")
    block = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "%s"}}\n</tool_call>'
    text = block % "Oslo" + "\n" + block % "Rome"
    final = CompletionOutput(0, text, [], None, None, "stop")
    for parallel, cities in [(True, ["Oslo", "Rome"]), (False, ["Oslo"])]:
        mode = resolve(request(parallel_tool_calls=parallel), hermes)
        output = ChatOutput(mode, hermes, None)
        message, finish = output.message(final)
        assert finish == "tool_calls"
        args = [json.loads(c["function"]["arguments"]) for c in message["tool_calls"]]
        assert [a["city"] for a in args] == cities
        stream, streamed = output.stream(), []
        for end in range(1, len(text) + 1):
            done = end == len(text)
            c = CompletionOutput(0, text[:end], [], None, None, "stop" if done else None)
            streamed += stream.delta(c)[0].get("tool_calls", [])
        assert [json.loads(c["function"]["arguments"])["city"] for c in streamed] == cities
    named = resolve(
        request(tool_choice={"type": "function", "function": {"name": "get_weather"}}), None
    )
    message, finish = ChatOutput(named, None, None).message(
        CompletionOutput(0, '{"city": "Rome"}', [], None, None, "stop")
    )
    assert finish == "stop" and message["tool_calls"][0]["function"]["name"] == "get_weather"
