"""Per-step state that the opaque attention op reads while the model runs.

The model graph sees only q, k, v and a layer index; the KV caches, the backend and this step's
paged-attention metadata travel here, entered with `set_forward_context(...)` around a forward.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from compiled_llm.attention_backends.base import AttentionBackend


@dataclass
class ForwardContext:
    backend: AttentionBackend
    kv_caches: list[torch.Tensor]  # one per layer, in the backend's layout
    attn_metadata: Any  # the backend's metadata for this step (built outside the graph)


_CONTEXT: contextvars.ContextVar[ForwardContext | None] = contextvars.ContextVar(
    "compiled_llm_forward_context", default=None
)


@contextlib.contextmanager
def set_forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    token = _CONTEXT.set(ctx)
    try:
        yield ctx
    finally:
        _CONTEXT.reset(token)


def get_forward_context() -> ForwardContext:
    ctx = _CONTEXT.get()
    if ctx is None:
        raise RuntimeError(
            "the attention op ran outside set_forward_context(): the model must be run by "
            "the engine's model runner (or a test that enters a ForwardContext)"
        )
    return ctx
