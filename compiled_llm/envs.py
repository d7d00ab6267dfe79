"""Environment variables the engine reads, in one typed place.

Only variables of our own (and `CXX`, which picks the C++ compiler) are read here. Variables
that configure a library we call are left to that library: `TRITON_INTERPRET` is Triton's switch
(the Triton backend checks it because Triton itself reads it), and `FLASHINFER_WORKSPACE_BASE` is
set by the FlashInfer backend before importing FlashInfer, which reads it at import time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any


def _flag(name: str, default: bool = False) -> bool:
    value = os.environ.get(name, "").strip().lower()
    return default if not value else value in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Envs:
    cache_dir: str  # COMPILED_LLM_CACHE_DIR: root of every on-disk cache
    disable_compile_cache: bool  # COMPILED_LLM_DISABLE_COMPILE_CACHE=1
    api_key: str | None  # COMPILED_LLM_API_KEY: the server's --api-key when the flag is not given
    flashinfer_prefill_backend: str  # COMPILED_LLM_FLASHINFER_PREFILL_BACKEND: fa2 (default) | fa3
    cxx: str | None  # CXX: the C++ compiler Inductor builds CPU kernels with
    # COMPILED_LLM_DEBUG_CUDA_GRAPHS=1: every CUDA-graph replay checks that its inputs are at
    # their captured addresses (a few microseconds a piece)
    debug_cuda_graphs: bool
    # COMPILED_LLM_PDL=0: our Triton kernels launch without Programmatic Dependent Launch
    # (kernels/pdl.py; on by default where the GPU has it)
    pdl: bool

    @classmethod
    def read(cls) -> Envs:
        default = os.path.join(os.path.expanduser("~"), ".cache", "compiled_llm")
        envs = cls(
            cache_dir=os.environ.get("COMPILED_LLM_CACHE_DIR", default),
            disable_compile_cache=_flag("COMPILED_LLM_DISABLE_COMPILE_CACHE"),
            api_key=os.environ.get("COMPILED_LLM_API_KEY") or None,
            flashinfer_prefill_backend=os.environ.get(
                "COMPILED_LLM_FLASHINFER_PREFILL_BACKEND", "fa2"
            ),
            cxx=os.environ.get("CXX") or None,
            debug_cuda_graphs=_flag("COMPILED_LLM_DEBUG_CUDA_GRAPHS"),
            pdl=_flag("COMPILED_LLM_PDL", default=True),
        )
        return dataclasses.replace(envs, **dict(_overrides.get()))


# (name, value) pairs `override` has set in this context.
_overrides: ContextVar[tuple[tuple[str, Any], ...]] = ContextVar(
    "compiled_llm_envs_overrides", default=()
)


@contextlib.contextmanager
def override(**values: Any) -> Iterator[None]:
    """`Envs.read()` answers `values` inside the block, in this thread only: for a tool that
    needs a setting for a while (`passes report` compiles with the compile cache off) without
    writing os.environ, which every process started meanwhile would inherit."""
    names = {f.name for f in dataclasses.fields(Envs)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise TypeError(f"unknown setting(s): {', '.join(unknown)}")
    token = _overrides.set((*_overrides.get(), *values.items()))
    try:
        yield
    finally:
        _overrides.reset(token)
