"""Frontend checks of `StructuredOutputsParams`: every constraint parses and compiles to an
xgrammar `Grammar` (tokenizer-independent, milliseconds), and a JSON schema uses no keyword that
xgrammar would silently ignore. A failure is a `StructuredOutputsError` naming the field.

`grammar_spec` is also the compile-cache key the engine core uses."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from typing import Any

from compiled_llm.sampling_params import StructuredOutputsParams


class StructuredOutputsError(ValueError):
    """A constraint that cannot be enforced; `param` is the path of the offending field."""

    def __init__(self, param: str, why: str) -> None:
        super().__init__(f"{param}: {why}")
        self.param = param


# Keywords xgrammar 0.2 accepts but does not enforce: a schema using them would be "obeyed"
# without the constraint holding, so it is refused instead.
UNSUPPORTED_KEYWORDS = frozenset(
    {
        "multipleOf",
        "uniqueItems",
        "contains",
        "minContains",
        "maxContains",
        "not",
        "if",
        "then",
        "else",
        "dependentRequired",
        "dependentSchemas",
        "dependencies",
        "unevaluatedItems",
        "unevaluatedProperties",
    }
)
# String formats xgrammar enforces (others leave the string unconstrained).
SUPPORTED_FORMATS = frozenset(
    {
        "email",
        "idn-email",
        "date",
        "time",
        "date-time",
        "duration",
        "uuid",
        "uri",
        "uri-reference",
        "uri-template",
        "iri",
        "iri-reference",
        "ipv4",
        "ipv6",
        "hostname",
        "idn-hostname",
        "json-pointer",
        "relative-json-pointer",
    }
)
# Longest run of whitespace a JSON grammar allows between two tokens: one character (a newline
# or a space) lets a model lay JSON out on lines, without letting it emit whitespace for ever,
# which small models do under greedy decoding. Indentation is not allowed: a larger bound makes
# xgrammar's bitmask fill dearer, at batch 64 (Llama-3 vocabulary, 2-core CPU) 0.09 ms a step
# unbounded, 0.17 at 1, 0.30 at 2, 0.77 at 20 (benchmarks/structured_output.py --host-only
# --json-whitespace N); the fill runs on the step loop, where it leaves the GPU idle.
MAX_JSON_WHITESPACE: int | None = 1
# `json_object`: any JSON object, as the schema {"type": "object"} with additional properties
# allowed (strict_mode off), so it gets the same whitespace bound.
JSON_OBJECT_SCHEMA = '{"type":"object"}'
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties", "propertyNames", "additionalItems")


def _subschemas(schema: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for key in _SCHEMA_MAPS:
        value = schema.get(key)
        if isinstance(value, dict):
            for name, sub in value.items():
                if isinstance(sub, dict):
                    yield from _subschemas(sub, f"{path}.{key}.{name}")
    for key in _SCHEMA_LISTS:
        value = schema.get(key)
        if isinstance(value, list):
            for i, sub in enumerate(value):
                if isinstance(sub, dict):
                    yield from _subschemas(sub, f"{path}.{key}.{i}")
    for key in _SCHEMA_VALUES:
        value = schema.get(key)
        if isinstance(value, dict):
            yield from _subschemas(value, f"{path}.{key}")
        elif isinstance(value, list):  # draft-4 tuple items
            for i, sub in enumerate(value):
                if isinstance(sub, dict):
                    yield from _subschemas(sub, f"{path}.{key}.{i}")


def check_schema_keywords(schema: dict[str, Any], path: str) -> None:
    for where, sub in _subschemas(schema, path):
        for key in sorted(UNSUPPORTED_KEYWORDS & sub.keys()):
            raise StructuredOutputsError(f"{where}.{key}", f"the keyword {key} is not supported")
        fmt = sub.get("format")
        if fmt is not None and fmt not in SUPPORTED_FORMATS:
            raise StructuredOutputsError(
                f"{where}.format", f"the string format {fmt!r} is not supported"
            )


def choice_grammar(choices: list[str]) -> str:
    """EBNF accepting exactly one of `choices` (JSON string escapes are EBNF's too)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def grammar_spec(so: StructuredOutputsParams) -> tuple[str, str, bool]:
    """(kind, text, any_whitespace): what the core compiles, and its cache key. A schema's text
    is compact JSON (property order kept: it is the order generated). Raises StructuredOutputsError
    for a schema that is not a JSON object."""
    kind = so.kind
    any_whitespace = not so.disable_any_whitespace
    if kind == "json":
        schema: Any = so.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise StructuredOutputsError("structured_outputs.json", f"not JSON: {e}") from None
        if not isinstance(schema, dict):
            raise StructuredOutputsError("structured_outputs.json", "must be a JSON object")
        return kind, json.dumps(schema, separators=(",", ":")), any_whitespace
    if kind == "choice":
        assert so.choice is not None
        return "grammar", choice_grammar(so.choice), any_whitespace
    if kind == "json_object":
        return kind, JSON_OBJECT_SCHEMA, any_whitespace
    text = so.regex if kind == "regex" else so.grammar
    assert text is not None
    return kind, text, any_whitespace


_XGRAMMAR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


def _clean(error: Exception) -> str:
    """xgrammar's message without its timestamp and C++ source location."""
    text = str(error).strip().splitlines()
    return _XGRAMMAR_PREFIX.sub("", text[0] if text else type(error).__name__)


def json_options(kind: str, any_whitespace: bool) -> dict[str, Any]:
    """xgrammar's JSON-schema options for a json / json_object constraint."""
    return {
        "any_whitespace": any_whitespace,
        "max_whitespace_cnt": MAX_JSON_WHITESPACE if any_whitespace else None,
        "strict_mode": kind == "json",
    }


@functools.lru_cache(maxsize=512)
def _compile_error(kind: str, text: str, any_whitespace: bool) -> str | None:
    import xgrammar as xgr

    try:
        if kind in ("json", "json_object"):
            xgr.Grammar.from_json_schema(text, **json_options(kind, any_whitespace))
        elif kind == "regex":
            xgr.Grammar.from_regex(text)
        elif kind == "grammar":
            xgr.Grammar.from_ebnf(text)
    except Exception as e:  # xgrammar raises RuntimeError (and ValueError) for bad specs
        return _clean(e)
    return None


def validate_structured_outputs(so: StructuredOutputsParams, param: str | None = None) -> None:
    """Raise StructuredOutputsError (naming `param`, default `structured_outputs.<kind>`) unless
    the constraint compiles and can be enforced as written."""
    param = param or f"structured_outputs.{so.kind}"
    try:
        kind, text, any_whitespace = grammar_spec(so)
    except StructuredOutputsError as e:
        raise StructuredOutputsError(param, str(e).split(": ", 1)[1]) from None
    if so.kind == "json":
        check_schema_keywords(json.loads(text), param)
    error = _compile_error(kind, text, any_whitespace)
    if error is not None:
        raise StructuredOutputsError(param, error)
