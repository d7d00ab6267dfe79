"""A worker entry point for tests/distributed/test_tp_engine.py that fails the way a rank's own
load can fail (its checkpoint folder gone), after joining the process group as usual."""

from __future__ import annotations

import dataclasses
from typing import Any

from compiled_llm.engine import tp_executor


def worker_with_missing_weights(config: Any, *args: Any) -> None:
    mc = dataclasses.replace(config.model_config, model="/nonexistent/checkpoint")
    tp_executor.worker_main(dataclasses.replace(config, model_config=mc), *args)


def worker_that_exits_at_once(config: Any, *args: Any) -> None:
    """What a worker does whose import of the main script fails (no `__main__` guard)."""
    import os

    os._exit(3)
