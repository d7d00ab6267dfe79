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


def accumulate(calls: list[dict], entries: list[dict]) -> int:
    """Adds streamed `delta.tool_calls` entries to `calls` (OpenAI's shape: a call's first entry
    has its index, id, type and name with arguments "", later ones only the index and an
    arguments fragment); returns how many argument fragments they carried."""
    fragments = 0
    for e in entries:
        if "id" in e:
            assert e["index"] == len(calls) and e["type"] == "function"
            assert e["function"]["name"] and e["function"]["arguments"] == ""
            calls.append({"id": e["id"], **e["function"]})
        else:
            assert set(e) == {"index", "function"} and set(e["function"]) == {"arguments"}
            assert e["function"]["arguments"]
            calls[e["index"]]["arguments"] += e["function"]["arguments"]
            fragments += 1
    return fragments


def streamed(parser_name: str, text: str, step: int) -> tuple[str, list[dict], int]:
    stream = ToolCallStream(get_tool_parser(parser_name))
    content, calls, fragments = "", [], 0
    for end in [*range(step, len(text), step), len(text)]:
        delta, entries = stream.feed(text[:end], finished=end == len(text))
        content += delta
        fragments += accumulate(calls, entries)
    return content, calls, fragments


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
    stream_content, stream_calls, fragments = streamed(name, text, step)
    assert stream_content.strip() == (content or "")
    # the streamed fragments add up to the whole response's arguments, exactly
    assert [(c["name"], c["arguments"]) for c in stream_calls] == [
        (c.name, c.arguments) for c in calls
    ]
    if step < 10:  # the weather call's arguments came in several fragments
        assert fragments >= 3


@pytest.mark.parametrize("name", ["hermes", "llama3_json"])
@pytest.mark.parametrize(
    "text",
    ["Just an answer, no tools.", "<tool_call>{not json}</tool_call>", "{not a call}", "<tool_"],
)
def test_text_without_valid_calls_is_content(name: str, text: str) -> None:
    content, calls = get_tool_parser(name).extract(text)
    assert (content, calls) == (text, [])
    assert streamed(name, text, 2) == (text, [], 0)


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
            accumulate(streamed, stream.delta(c)[0].get("tool_calls", []))
        assert [json.loads(c["arguments"])["city"] for c in streamed] == cities
    named = resolve(
        request(tool_choice={"type": "function", "function": {"name": "get_weather"}}), None
    )
    message, finish = ChatOutput(named, None, None).message(
        CompletionOutput(0, '{"city": "Rome"}', [], None, None, "stop")
    )
    assert finish == "stop" and message["tool_calls"][0]["function"]["name"] == "get_weather"


def stream_choice(output: ChatOutput, text: str, step: int, finish: str = "stop") -> tuple:
    """(content, reasoning, calls, fragments, finish_reason) of `text` streamed `step`
    characters at a time through a ChoiceStream."""
    stream = output.stream()
    content, reasoning, calls, fragments, reason = "", "", [], 0, None
    for end in [*range(step, len(text), step), len(text)]:
        done = end == len(text)
        c = CompletionOutput(0, text[:end], [], None, None, finish if done else None)
        delta, reason = stream.delta(c)
        content += delta.get("content", "")
        reasoning += delta.get("reasoning_content", "")
        fragments += accumulate(calls, delta.get("tool_calls", []))
    return content, reasoning, calls, fragments, reason


def whole_calls(output: ChatOutput, text: str) -> tuple[dict, str | None]:
    return output.message(CompletionOutput(0, text, [], None, None, "stop"))


@pytest.mark.parametrize("step", [1, 5, 1000])
def test_forced_choices_stream_arguments_as_they_grow(step: int) -> None:
    """required and named tool choices (compact JSON, as their grammar writes it): the header
    first, then argument fragments that add up to the whole response's arguments."""
    weather = '{"city":"Paris, the capital of France","unit":"celsius"}'
    cases = [
        (
            resolve(request(tool_choice="required"), None),
            f'[{{"name":"get_weather","parameters":{weather}}},'
            '{"name":"get_time","parameters":{}}]',
            "tool_calls",
        ),
        (
            resolve(
                request(tool_choice={"type": "function", "function": {"name": "get_weather"}}),
                None,
            ),
            weather,
            "stop",
        ),
    ]
    for mode, text, finish in cases:
        output = ChatOutput(mode, None, None)
        message, whole_finish = whole_calls(output, text)
        assert whole_finish == finish and message["content"] is None
        want = [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
        assert want[0] == ("get_weather", weather)  # the arguments as generated
        content, _, calls, fragments, reason = stream_choice(output, text, step)
        assert content == "" and reason == finish
        assert [(c["name"], c["arguments"]) for c in calls] == want
        assert all(json.loads(c["arguments"]) is not None for c in calls)
        if step == 1:
            assert fragments >= len(weather) - 1


def test_forced_choice_cut_short_while_streaming() -> None:
    """A named choice cut short by max_tokens: the header and the arguments so far were sent,
    the choice ends with "length"; a required choice cut before any name is content."""
    named = resolve(
        request(tool_choice={"type": "function", "function": {"name": "get_time"}}), None
    )
    content, _, calls, _, reason = stream_choice(ChatOutput(named, None, None), '{"zo', 1, "length")
    assert (content, reason) == ("", "length")
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_time", '{"zo')]
    required = resolve(request(tool_choice="required"), None)
    text = '[{"name":"get_'
    got = stream_choice(ChatOutput(required, None, None), text, 1, "length")
    assert got == (text, "", [], 0, "length")


@pytest.mark.parametrize("name", ["hermes", "llama3_json"])
def test_auto_stream_with_reasoning_and_spaced_arguments(name: str) -> None:
    """A reasoning model's thinking streams as reasoning_content, the text before a call as
    content, and a call's arguments as written (spacing and key order kept), in fragments that
    add up to the whole response's arguments."""
    args = '{ "city" :  "Oslo",\n  "unit": "celsius", "days": [1, 2, {"x": "}"}] }'
    if name == "hermes":
        body = (
            f'Checking.\n<tool_call>\n{{"name": "get_weather", "arguments": {args}}}\n</tool_call>'
        )
    else:
        body = f'{{"name": "get_weather", "parameters": {args}}}'
    text = "<think>\nhmm\n</think>\n\n" + body
    parser = get_tool_parser(name)
    output = ChatOutput(resolve(request(), parser), parser, get_reasoning_parser("qwen3"))
    message, finish = whole_calls(output, text)
    assert finish == "tool_calls" and message["reasoning_content"] == "\nhmm\n"
    assert message["tool_calls"][0]["function"]["arguments"] == args
    for step in (1, 3, 1000):
        content, reasoning, calls, fragments, reason = stream_choice(output, text, step)
        assert (reasoning, reason) == ("\nhmm\n", "tool_calls")
        assert content.strip() == (message["content"] or "")
        assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", args)]
        assert fragments >= (2 if step < 1000 else 1)
