"""Structured outputs: constraints (JSON schema, regex, choice, EBNF) turned into xgrammar
grammars, checked in the frontend and enforced in the engine core by a per-sample token bitmask.
See docs/structured_output.md."""
