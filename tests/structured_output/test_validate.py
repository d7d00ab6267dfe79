"""Frontend checks of structured-output constraints: every bad input is a ValueError naming the
field; good ones pass. No model needed."""

from __future__ import annotations

import pytest

from compiled_llm.sampling_params import SamplingParams, StructuredOutputsParams
from compiled_llm.structured_output.validate import (
    MAX_JSON_WHITESPACE,
    StructuredOutputsError,
    choice_grammar,
    grammar_spec,
    json_options,
    validate_structured_outputs,
)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"json": {}, "regex": "a"}, {"choice": ["a"], "json_object": True}],
)
def test_exactly_one_constraint(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="^structured_outputs must set exactly one of"):
        StructuredOutputsParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"choice": []}, "choice"),
        ({"choice": ["a", ""]}, "choice"),
        ({"regex": 5}, "regex"),
        ({"json": 5}, "json"),
    ],
)
def test_wrong_types(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^structured_outputs.{field}"):
        StructuredOutputsParams(**kwargs)


def test_sampling_params_refuses_a_dict() -> None:
    with pytest.raises(ValueError, match="^structured_outputs must be a StructuredOutputsParams"):
        SamplingParams(structured_outputs={"json": {}})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "so, param, message",
    [
        (StructuredOutputsParams(json="{not json"), "structured_outputs.json", "not JSON"),
        (StructuredOutputsParams(json="[1]"), "structured_outputs.json", "a JSON object"),
        (StructuredOutputsParams(json={"type": "foo"}), "structured_outputs.json", "foo"),
        (
            StructuredOutputsParams(json={"$ref": "#/$defs/missing"}),
            "structured_outputs.json",
            "missing",
        ),
        (
            StructuredOutputsParams(
                json={"type": "object", "properties": {"n": {"type": "number", "multipleOf": 3}}}
            ),
            "structured_outputs.json.properties.n.multipleOf",
            "multipleOf is not supported",
        ),
        (
            StructuredOutputsParams(
                json={"type": "array", "items": {"type": "array", "uniqueItems": True}}
            ),
            "structured_outputs.json.items.uniqueItems",
            "not supported",
        ),
        (
            StructuredOutputsParams(json={"anyOf": [{"type": "string", "format": "telephone"}]}),
            "structured_outputs.json.anyOf.0.format",
            "telephone",
        ),
        (StructuredOutputsParams(regex="[a-"), "structured_outputs.regex", "Unclosed"),
        (StructuredOutputsParams(regex="(?=a)b"), "structured_outputs.regex", "Lookahead"),
        (StructuredOutputsParams(grammar="root ::= x"), "structured_outputs.grammar", "x"),
        (StructuredOutputsParams(grammar='start ::= "a"'), "structured_outputs.grammar", "root"),
    ],
)
def test_bad_constraints_name_the_field(
    so: StructuredOutputsParams, param: str, message: str
) -> None:
    with pytest.raises(StructuredOutputsError, match=message) as info:
        validate_structured_outputs(so)
    assert info.value.param == param
    assert str(info.value).startswith(param + ": ")
    assert "/project/" not in str(info.value)  # xgrammar's C++ location is dropped


def test_caller_names_the_field() -> None:
    so = StructuredOutputsParams(json={"type": "integer", "multipleOf": 2})
    with pytest.raises(StructuredOutputsError) as info:
        validate_structured_outputs(so, "response_format.json_schema.schema")
    assert info.value.param == "response_format.json_schema.schema.multipleOf"


@pytest.mark.parametrize(
    "so",
    [
        StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "string"}}}),
        StructuredOutputsParams(json='{"type": "string", "format": "date"}'),
        # a property *named* like an unsupported keyword is fine
        StructuredOutputsParams(json={"type": "object", "properties": {"not": {"type": "null"}}}),
        StructuredOutputsParams(regex=r"\d{3}-[a-z]+"),
        StructuredOutputsParams(choice=["yes", "no"]),
        StructuredOutputsParams(grammar='root ::= "a" root | "b"'),
        StructuredOutputsParams(json_object=True),
    ],
)
def test_good_constraints_pass(so: StructuredOutputsParams) -> None:
    validate_structured_outputs(so)


def test_schema_key_keeps_property_order() -> None:
    schema = {"type": "object", "properties": {"z": {"type": "string"}, "a": {"type": "string"}}}
    _, text, _ = grammar_spec(StructuredOutputsParams(json=schema))
    assert text.index('"z"') < text.index('"a"')
    assert grammar_spec(StructuredOutputsParams(json=schema)) == grammar_spec(
        StructuredOutputsParams(json=schema.copy())
    )


def test_choice_grammar_matches_exactly_the_choices() -> None:
    import xgrammar as xgr

    choices = ['say "hi"', "back\\slash", "new\nline", "ünï"]
    grammar = xgr.Grammar.from_ebnf(choice_grammar(choices))
    info = xgr.TokenizerInfo([chr(c) for c in range(32, 127)] + ["\n", "ü", "ï"])
    compiled = xgr.GrammarCompiler(info).compile_grammar(grammar)
    for text in [*choices, "say hi", "back", "x"]:
        matcher = xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
        ok = matcher.accept_string(text) and matcher.is_terminated()
        assert ok == (text in choices), text


def test_json_whitespace_runs_are_bounded() -> None:
    """Free whitespace in JSON is one character between two tokens (MAX_JSON_WHITESPACE): a
    newline or a space, never a run a small model could loop on; with disable_any_whitespace,
    xgrammar's fixed separators (", " and ": ")."""
    import xgrammar as xgr

    schema = '{"type":"object","properties":{"a":{"type":"integer"}},"required":["a"]}'
    accepts = xgr.testing._is_grammar_accept_string
    free = xgr.Grammar.from_json_schema(schema, **json_options("json", any_whitespace=True))
    assert MAX_JSON_WHITESPACE == 1
    for text in ('{"a":1}', '{"a": 1}', '{\n"a":1\n}'):
        assert accepts(free, text), text
    for text in ('{"a":  1}', '{\n  "a": 1}', '{"a":1\n\n}'):
        assert not accepts(free, text), text
    compact = xgr.Grammar.from_json_schema(schema, **json_options("json", any_whitespace=False))
    assert accepts(compact, '{"a": 1}') and not accepts(compact, '{"a":1}')
    assert not accepts(compact, '{\n"a": 1}')
