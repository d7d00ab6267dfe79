"""`python -m compiled_llm.cli`, the same as the `compiled-llm` command."""

import sys

from compiled_llm.cli import main

sys.exit(main())
