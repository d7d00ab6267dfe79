"""The grammar process's entry point: `python -m compiled_llm.structured_output.grammar_process
SPEC`, started by manager._Process. A module of its own, which nothing imports, so that runpy
does not execute a module the package's imports have already loaded."""

from __future__ import annotations

import json
import sys

from compiled_llm.structured_output.matchers import serve

if __name__ == "__main__":
    serve(json.loads(sys.argv[1]))
