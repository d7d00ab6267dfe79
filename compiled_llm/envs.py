"""Environment variables the engine reads, in one typed place."""

from __future__ import annotations

import os
from dataclasses import dataclass


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Envs:
    cache_dir: str  # COMPILED_LLM_CACHE_DIR: root of every on-disk cache
    disable_compile_cache: bool  # COMPILED_LLM_DISABLE_COMPILE_CACHE=1

    @classmethod
    def read(cls) -> Envs:
        default = os.path.join(os.path.expanduser("~"), ".cache", "compiled_llm")
        return cls(
            cache_dir=os.environ.get("COMPILED_LLM_CACHE_DIR", default),
            disable_compile_cache=_flag("COMPILED_LLM_DISABLE_COMPILE_CACHE"),
        )
