"""`python -m compiled_llm.cli`, the same as the `compiled-llm` command."""

from compiled_llm.cli import run

run()
