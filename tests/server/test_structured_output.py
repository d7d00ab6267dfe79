"""Structured outputs through the server and the official `openai` client: every response to a
JSON-schema request parses and validates (jsonschema is the oracle), regex and choice constraints
hold on every sample, and bad constraints get a 400 naming the field."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from tests.server.conftest import API_KEY, Server

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
NAME = {"type": "string", "maxLength": 16}

SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"name": NAME}, "required": ["name"]},
    {
        "type": "object",
        "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["age"],
    },
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "green", "blue"]}},
        "required": ["colour"],
    },
    {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 3}},
        "required": ["tags"],
    },
    {
        "type": "object",
        "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["score"],
    },
    {
        "type": "object",
        "properties": {"n": {"type": "integer", "exclusiveMinimum": 10, "maximum": 99}},
        "required": ["n"],
    },
    {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "name": NAME,
                    "id": {"type": "integer", "minimum": 1, "maximum": 9999},
                },
                "required": ["name", "id"],
            }
        },
        "required": ["user"],
    },
    {
        "type": "object",
        "properties": {
            "points": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "x": {"type": "integer", "minimum": -9, "maximum": 9},
                        "y": {"type": "integer", "minimum": -9, "maximum": 9},
                    },
                    "required": ["x", "y"],
                },
                "minItems": 1,
                "maxItems": 2,
            }
        },
        "required": ["points"],
    },
    {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 9},
        "minItems": 3,
        "maxItems": 3,
    },
    {
        "type": "object",
        "properties": {
            "kind": {"const": "point"},
            "v": {"type": "integer", "minimum": 0, "maximum": 5},
        },
        "required": ["kind", "v"],
    },
    {
        "type": "object",
        "properties": {
            "value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 50}, {"type": "null"}]}
        },
        "required": ["value"],
    },
    {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"}},
        "required": ["code"],
    },
    {
        "type": "object",
        "properties": {"when": {"type": "string", "format": "date"}},
        "required": ["when"],
    },
    {
        "type": "object",
        "properties": {"word": {"type": "string", "minLength": 2, "maxLength": 6}},
        "required": ["word"],
    },
    {
        "$defs": {
            "item": {
                "type": "object",
                "properties": {"sku": NAME, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                "required": ["sku", "qty"],
            }
        },
        "type": "object",
        "properties": {
            "order": {
                "type": "array",
                "items": {"$ref": "#/$defs/item"},
                "minItems": 1,
                "maxItems": 2,
            }
        },
        "required": ["order"],
    },
    {
        "type": "object",
        "properties": {"a": NAME, "b": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["a"],
    },
    {
        "type": "object",
        "properties": {"level": {"enum": [1, 2, 3]}, "label": {"enum": ["low", "high"]}},
        "required": ["level", "label"],
    },
    {
        "type": "object",
        "properties": {
            "nested": {
                "type": "object",
                "properties": {
                    "deeper": {
                        "type": "object",
                        "properties": {"flag": {"type": "boolean"}},
                        "required": ["flag"],
                    }
                },
                "required": ["deeper"],
            }
        },
        "required": ["nested"],
    },
    {
        "type": "object",
        "properties": {
            "matrix": {
                "type": "array",
                "items": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 0, "maximum": 9},
                    "minItems": 2,
                    "maxItems": 2,
                },
                "minItems": 2,
                "maxItems": 2,
            }
        },
        "required": ["matrix"],
    },
    {
        "type": "object",
        "properties": {
            "price": {"type": "number", "minimum": 0.5, "maximum": 100},
            "currency": {"enum": ["EUR", "USD"]},
        },
        "required": ["price", "currency"],
    },
    {
        "type": "object",
        "properties": {"id": {"type": "string", "format": "uuid"}},
        "required": ["id"],
    },
    {
        "type": ["object"],
        "properties": {"empty": {"type": "array", "maxItems": 0}},
        "required": ["empty"],
    },
]


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)


def ask(client: openai.OpenAI, schema: dict[str, Any], **kw: Any) -> Any:
    prompt = "Reply with JSON for this schema: " + json.dumps(schema)
    args: dict[str, Any] = dict(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        response_format={"type": "json_schema", "json_schema": {"name": "out", "schema": schema}},
        # room for the longest valid answers: e.g. three 16-character strings of emoji, each
        # character several tokens
        max_completion_tokens=320,
        temperature=0,
    )
    return client.chat.completions.create(**{**args, **kw})


def test_json_schemas_parse_and_validate(client: openai.OpenAI) -> None:
    assert len(SCHEMAS) >= 20
    with ThreadPoolExecutor(len(SCHEMAS)) as pool:
        replies = list(pool.map(lambda s: ask(client, s), SCHEMAS))
    for schema, reply in zip(SCHEMAS, replies):
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", (schema, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_schema_streamed_and_sampled(client: openai.OpenAI) -> None:
    schema = SCHEMAS[7]
    stream = ask(client, schema, stream=True, n=2, temperature=1.0, seed=3)
    text = ["", ""]
    finish = [None, None]
    for chunk in stream:
        for c in chunk.choices:
            text[c.index] += c.delta.content or ""
            finish[c.index] = c.finish_reason or finish[c.index]
    assert finish == ["stop", "stop"]
    for t in text:
        jsonschema.validate(json.loads(t), schema)


def test_json_object(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[
            {
                "role": "user",
                "content": 'Give a JSON object with the keys "name" and "age" of a cat.',
            }
        ],
        response_format={"type": "json_object"},
        max_completion_tokens=120,
        temperature=0,
    )
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_regex_and_choice_hold_on_every_sample(client: openai.OpenAI) -> None:
    regex = r"[0-9]{3}-[a-z]{2,5}"
    choices = ["alpha", "beta", "gamma delta"]

    def complete(so: dict[str, Any], prompt: str) -> Any:
        return client.completions.create(
            model=MODEL,
            prompt=prompt,
            n=6,
            temperature=1.2,
            seed=11,
            max_tokens=16,
            extra_body={"structured_outputs": so},
        )

    with ThreadPoolExecutor(2) as pool:
        by_regex, by_choice = pool.map(
            lambda args: complete(*args),
            [({"regex": regex}, "Ticket id:"), ({"choice": choices}, "Pick one:")],
        )
    assert len(by_regex.choices) == len(by_choice.choices) == 6
    for c in by_regex.choices:
        assert re.fullmatch(regex, c.text), c.text
    for c in by_choice.choices:
        assert c.text in choices and c.finish_reason == "stop"


def test_vllm_guided_fields_constrain(client: openai.OpenAI) -> None:
    """vLLM's earlier `guided_*` names constrain like `structured_outputs` (not ignored as unknown
    fields, which would answer unconstrained)."""
    choices = ["alpha", "beta", "gamma delta"]
    regex = r"[0-9]{3}-[a-z]{2,5}"
    for extra, ok in (
        ({"guided_choice": choices}, lambda text: text in choices),
        ({"guided_regex": regex}, lambda text: re.fullmatch(regex, text)),
        (
            {"guided_json": {"type": "string", "enum": ["yes", "no"]}},
            lambda text: json.loads(text) in ("yes", "no"),
        ),
    ):
        out = client.completions.create(
            model=MODEL,
            prompt="Answer:",
            n=4,
            temperature=1.2,
            seed=5,
            max_tokens=24,
            extra_body=extra,
        )
        for c in out.choices:
            assert ok(c.text), (extra, c.text)


SCHEMA_PARAM = "response_format.json_schema.schema"
BAD = [
    # (case, body additions, param)
    (
        "bad type",
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "foo"}},
            }
        },
        SCHEMA_PARAM,
    ),
    (
        "unsupported keyword",
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {
                        "type": "object",
                        "properties": {"n": {"type": "integer", "multipleOf": 2}},
                    },
                },
            }
        },
        SCHEMA_PARAM + ".properties.n.multipleOf",
    ),
    (
        "no schema",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        SCHEMA_PARAM,
    ),
    ("unknown format type", {"response_format": {"type": "yaml"}}, "response_format.type"),
    ("bad regex", {"structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex"),
    (
        "bad grammar",
        {"structured_outputs": {"grammar": "root ::= nothing"}},
        "structured_outputs.grammar",
    ),
    (
        "two constraints",
        {"structured_outputs": {"regex": "a", "choice": ["a"]}},
        "structured_outputs",
    ),
    ("empty choice", {"structured_outputs": {"choice": []}}, "structured_outputs"),
    (
        "both fields",
        {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
        "structured_outputs",
    ),
    ("bad guided regex", {"guided_regex": "[a-"}, "guided_regex"),
    ("two guided", {"guided_regex": "a", "guided_choice": ["a"]}, "guided_regex"),
    (
        "guided and structured_outputs",
        {"guided_choice": ["a"], "structured_outputs": {"regex": "a"}},
        "guided_choice",
    ),
]


@pytest.mark.parametrize("case,extra,param", BAD, ids=[b[0] for b in BAD])
def test_bad_constraints_answer_400(server: Server, case: str, extra: dict, param: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
    r = server.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert error["message"]
    if "response_format" not in extra:
        r = server.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param


# --- tool calling (this module's server runs with the hermes parser) ------------------------------
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"enum": ["UTC", "CET"]}},
                "required": ["zone"],
            },
        },
    },
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
WEATHER_Q = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from tests.server.conftest import start_server

    log = tmp_path_factory.mktemp("server") / "server.log"
    s = start_server(
        log,
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "hermes",
        "--reasoning-parser",
        "qwen3",
        # the grammar matchers in their own process, as by default on CUDA (test_llm.py runs
        # both places through the LLM class)
        "--structured-outputs-matchers",
        "process",
    )
    yield s
    s.kill()


def check_calls(calls: list[Any]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


def tool_request(client: openai.OpenAI, **kw: Any) -> Any:
    args: dict[str, Any] = dict(
        model=MODEL, messages=WEATHER_Q, tools=TOOLS, max_completion_tokens=120, temperature=0
    )
    return client.chat.completions.create(**{**args, **kw})


def test_required_and_named_tool_choice_always_call(client: openai.OpenAI) -> None:
    named_choice = {"type": "function", "function": {"name": "get_time"}}
    with ThreadPoolExecutor(2) as pool:
        required, named = pool.map(
            lambda kw: tool_request(client, **kw),
            [
                {"tool_choice": "required", "n": 4, "temperature": 1.0, "seed": 2},
                {"tool_choice": named_choice},
            ],
        )
    assert len(required.choices) == 4
    for choice in [*required.choices, *named.choices]:
        # a forced function ends as "stop" (OpenAI); a required choice as "tool_calls"
        assert choice.finish_reason == ("tool_calls" if choice in required.choices else "stop")
        assert choice.message.content is None
        check_calls(choice.message.tool_calls)
    assert [c.function.name for c in named.choices[0].message.tool_calls] == ["get_time"]


def stream_tool_request(client: openai.OpenAI, **kw: Any) -> tuple[Any, list[list[Any]], str]:
    """A streamed tool request: (the completion the openai client's own stream accumulator
    builds from the chunks, each call's `delta.tool_calls` entries in order, the content). The
    entries are checked to have OpenAI's streamed shape on the way."""
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState()
    entries: list[list[Any]] = []
    content = ""
    for chunk in tool_request(client, stream=True, **kw):
        state.handle_chunk(chunk)
        for c in chunk.choices:
            content += c.delta.content or ""
            for call in c.delta.tool_calls or []:
                if call.index == len(entries):  # a call's first entry: its header
                    assert call.id and call.id.startswith("chatcmpl-tool-")
                    assert call.type == "function" and call.function.name
                    assert call.function.arguments == ""
                    entries.append([])
                else:  # then only the index and a fragment of the arguments
                    assert call.id is None and call.type is None and call.function.name is None
                    assert call.function.arguments
                entries[call.index].append(call)
    return state.get_final_completion(), entries, content


def same_calls(streamed: Any, whole: Any) -> list[tuple[str, str]]:
    """The (name, arguments) of both responses' calls, which must be the same, the arguments
    text exactly; each parses."""
    got = [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls]
    want = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert got == want
    assert streamed.finish_reason == whole.finish_reason
    for _, arguments in got:
        json.loads(arguments)
    return got


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_forced_tool_choice_streamed_like_whole(client: openai.OpenAI, choice: Any) -> None:
    """required and named choices stream each call's header, then its arguments in fragments;
    the openai client's accumulated stream equals the non-streamed response (greedy)."""
    whole = tool_request(client, tool_choice=choice).choices[0]
    final, entries, content = stream_tool_request(client, tool_choice=choice)
    streamed = final.choices[0]
    assert content == "" and not streamed.message.content  # the role chunk carries ""
    same_calls(streamed, whole)
    check_calls(streamed.message.tool_calls)
    assert streamed.finish_reason == ("tool_calls" if choice == "required" else "stop")
    assert all(len(e) >= 3 for e in entries)  # header + at least two argument fragments


HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
TWO_CALLS = (
    "Let me look.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris",  "unit": "celsius"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
)


@pytest.mark.parametrize("parallel", [True, False])
def test_auto_tool_calls_stream_incrementally(client: openai.OpenAI, parallel: bool) -> None:
    """tool_choice auto, two hermes calls (forced text, which the small model would not write):
    content first, then indexes 0 and 1, each a header then argument fragments adding up to
    the non-streamed arguments (as written, spacing kept); parallel_tool_calls false keeps the
    first call only."""
    kw: dict[str, Any] = dict(
        extra_body={"structured_outputs": {"choice": [TWO_CALLS]}},
        parallel_tool_calls=parallel,
        max_completion_tokens=200,
    )
    whole = tool_request(client, **kw).choices[0]
    final, entries, content = stream_tool_request(client, **kw)
    streamed = final.choices[0]
    assert content == "Let me look.\n" and whole.message.content == "Let me look."
    calls = same_calls(streamed, whole)
    assert [c[0] for c in calls] == (["get_weather", "get_time"] if parallel else ["get_weather"])
    assert calls[0][1] == '{"city": "Paris",  "unit": "celsius"}'
    assert [e[0].index for e in entries] == list(range(len(calls)))
    assert len(entries[0]) >= 3  # header + at least two argument fragments
    assert streamed.finish_reason == "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
def test_auto_tool_call_round_trip(client: openai.OpenAI, stream: bool) -> None:
    """tool_choice auto: the output (forced here to a hermes-style call, which the small model
    would not write on its own) is read by the parser into tool_calls; the call and the tool's
    result then go back as messages and the model answers."""
    forced = {"structured_outputs": {"choice": [HERMES_CALL]}}
    if stream:
        final, _, content = stream_tool_request(client, extra_body=forced)
        choice = final.choices[0]
        assert content == ""
    else:
        choice = tool_request(client, extra_body=forced).choices[0]
        assert choice.message.content is None
    finish, tool_calls = choice.finish_reason, choice.message.tool_calls
    assert finish == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in tool_calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"})
    ]
    history = [
        *WEATHER_Q,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": c.function.arguments},
                }
                for c in tool_calls
            ],
        },
        {"role": "tool", "tool_call_id": tool_calls[0].id, "content": "18 degrees and sunny"},
    ]
    answer = tool_request(client, messages=history, max_completion_tokens=16)
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


def test_plain_answer_under_auto_is_content(client: openai.OpenAI) -> None:
    """No <tool_call> in the text: it stays content, finish_reason as usual; the qwen3
    reasoning parser leaves text without <think> alone."""
    reply = tool_request(client, max_completion_tokens=8)
    message = reply.choices[0].message
    assert message.content and not message.tool_calls
    assert reply.choices[0].finish_reason == "length"
    assert getattr(message, "reasoning_content", None) is None


TOOL_BAD = [
    (
        "unknown tool",
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
    ),
    ("tool_choice without tools", {"tool_choice": "required"}, "tool_choice"),
    (
        "unsupported keyword in a tool",
        {
            "tools": [
                {
                    "type": "function",
                    "function": {"name": "f", "parameters": {"type": "integer", "multipleOf": 3}},
                }
            ],
            "tool_choice": "required",
        },
        "tools.0.function.parameters.multipleOf",
    ),
    ("bad tool type", {"tools": [{"type": "web", "function": {"name": "f"}}]}, "tools.0.type"),
]


@pytest.mark.parametrize("case,extra,param", TOOL_BAD, ids=[b[0] for b in TOOL_BAD])
def test_bad_tool_requests_answer_400(server: Server, case: str, extra: dict, param: str) -> None:
    body = {"messages": WEATHER_Q, "max_tokens": 4, **extra}
    r = server.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_split(client: openai.OpenAI, stream: bool) -> None:
    """--reasoning-parser qwen3: a response opening with <think> (forced here: the small model
    does not think) has its thinking in reasoning_content, the rest in content."""
    forced = {"structured_outputs": {"choice": ["<think>\nIt is Paris.\n</think>\n\nParis."]}}
    args: dict[str, Any] = dict(
        model=MODEL, messages=WEATHER_Q, max_completion_tokens=40, temperature=0, extra_body=forced
    )
    if stream:
        reasoning = content = ""
        for chunk in client.chat.completions.create(stream=True, **args):
            for c in chunk.choices:
                reasoning += getattr(c.delta, "reasoning_content", None) or ""
                content += c.delta.content or ""
    else:
        message = client.chat.completions.create(**args).choices[0].message
        reasoning, content = getattr(message, "reasoning_content", None), message.content
    assert (reasoning, content) == ("\nIt is Paris.\n", "Paris.")
