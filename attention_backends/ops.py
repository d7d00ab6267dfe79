"""The custom ops through which compiled graphs reach the paged KV cache.

The model calls one generic op, `compiled_llm::attention(q, k, v, layer_idx, *attrs)`, where
`attrs` are the layer's static attributes (`LayerAttention`'s fields, in order: sliding window,
logits soft-cap; None where unused). The compiler's lowering pass replaces it with the selected
backend's pair of ops, `compiled_llm::<backend>_kv_write(k, v, layer_idx) -> dep` and
`compiled_llm::<backend>_attention(q, dep, layer_idx, *attrs) -> out`; the empty `dep` tensor
orders the write before the read. Backends that accept it (`accepts_fused_rope_kv_write`) also get
`compiled_llm::<backend>_rope_kv_write(q, k, v, cos, sin, layer_idx) -> (q_rot, dep)`, which the
`rope_kv_write` pass puts in place of RoPE of q and k plus the KV write. None of the ops carry the
cache or metadata as graph inputs: they read the forward context, so graph pieces between
attention layers are identical and compile once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from compiled_llm.attention_backends.base import LayerAttention
from compiled_llm.attention_backends.registry import get_backend_class
from compiled_llm.forward_context import ForwardContext, get_forward_context

_LIB = torch.library.Library("compiled_llm", "FRAGMENT")

# The schema of LayerAttention's fields, in order, as the ops take them.
_LAYER_ARGS = "int? sliding_window=None, float? logits_soft_cap=None"


def _attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer_idx: int,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
) -> torch.Tensor:
    ctx = get_forward_context()
    layer = LayerAttention(sliding_window, logits_soft_cap)
    return ctx.backend.forward(q, k, v, ctx.kv_caches[layer_idx], ctx.attn_metadata, layer)


def _attention_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer_idx: int,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
) -> torch.Tensor:
    return torch.empty_like(q)


_LIB.define(f"attention(Tensor q, Tensor k, Tensor v, int layer_idx, {_LAYER_ARGS}) -> Tensor")
_LIB.impl("attention", _attention, "CompositeExplicitAutograd")
torch.library.register_fake("compiled_llm::attention", _attention_fake, lib=_LIB)


@dataclass(frozen=True)
class BackendOps:
    """The graph ops of one backend, as OpOverloads the lowering pass can insert."""

    kv_write: torch._ops.OpOverload
    attention: torch._ops.OpOverload
    rope_kv_write: torch._ops.OpOverload | None = None  # only where the backend accepts it


_BACKEND_OPS: dict[str, BackendOps] = {}


def backend_ops(name: str) -> BackendOps:
    """Define (once) and return the kv_write/attention ops for backend `name` (and its fused
    RoPE + KV-write op where the backend accepts one)."""
    if name in _BACKEND_OPS:
        return _BACKEND_OPS[name]

    def _backend(layer_idx: int) -> tuple[ForwardContext, torch.Tensor]:
        ctx = get_forward_context()
        if ctx.backend.name != name:
            raise RuntimeError(
                f"graph was lowered for attention backend {name!r} but the engine runs "
                f"{ctx.backend.name!r}"
            )
        return ctx, ctx.kv_caches[layer_idx]

    def kv_write(k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> torch.Tensor:
        ctx, cache = _backend(layer_idx)
        ctx.backend.write_kv(k, v, cache, ctx.attn_metadata)
        return k.new_empty(0)

    def attention(
        q: torch.Tensor,
        dep: torch.Tensor,
        layer_idx: int,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
    ) -> torch.Tensor:
        ctx, cache = _backend(layer_idx)
        out = torch.empty_like(q)
        layer = LayerAttention(sliding_window, logits_soft_cap)
        ctx.backend.attend(q, cache, ctx.attn_metadata, out, layer)
        return out

    def attention_fake(
        q: torch.Tensor,
        dep: torch.Tensor,
        layer_idx: int,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
    ) -> torch.Tensor:
        return torch.empty_like(q)

    _LIB.define(f"{name}_kv_write(Tensor k, Tensor v, int layer_idx) -> Tensor")
    _LIB.impl(f"{name}_kv_write", kv_write, "CompositeExplicitAutograd")
    torch.library.register_fake(
        f"compiled_llm::{name}_kv_write", lambda k, v, layer_idx: k.new_empty(0), lib=_LIB
    )
    _LIB.define(f"{name}_attention(Tensor q, Tensor dep, int layer_idx, {_LAYER_ARGS}) -> Tensor")
    _LIB.impl(f"{name}_attention", attention, "CompositeExplicitAutograd")
    torch.library.register_fake(f"compiled_llm::{name}_attention", attention_fake, lib=_LIB)
    namespace = torch.ops.compiled_llm
    fused = None
    if get_backend_class(name).accepts_fused_rope_kv_write:
        _define_rope_kv_write(name, _backend)
        fused = getattr(namespace, f"{name}_rope_kv_write").default
    ops = BackendOps(
        kv_write=getattr(namespace, f"{name}_kv_write").default,
        attention=getattr(namespace, f"{name}_attention").default,
        rope_kv_write=fused,
    )
    _BACKEND_OPS[name] = ops
    return ops


def _define_rope_kv_write(
    name: str, backend: Callable[[int], tuple[ForwardContext, torch.Tensor]]
) -> None:
    """`<name>_rope_kv_write`: the rotated q comes back as a new contiguous tensor (the fake
    promises exactly that layout to the pieces compiled after it), q and k are left unchanged."""

    def rope_kv_write(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layer_idx: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx, cache = backend(layer_idx)
        q_rot = ctx.backend.rope_write_kv(q, k, v, cos, sin, cache, ctx.attn_metadata)
        return q_rot.contiguous(), k.new_empty(0)

    def fake(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layer_idx: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return q.new_empty(q.shape), k.new_empty(0)

    _LIB.define(
        f"{name}_rope_kv_write(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, "
        "int layer_idx) -> (Tensor, Tensor)"
    )
    _LIB.impl(f"{name}_rope_kv_write", rope_kv_write, "CompositeExplicitAutograd")
    torch.library.register_fake(f"compiled_llm::{name}_rope_kv_write", fake, lib=_LIB)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer_idx: int,
    layer: LayerAttention | None = None,
) -> torch.Tensor:
    """Paged causal attention for one layer: q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D], with
    the layer's static attributes (None: plain causal)."""
    if layer is None:
        return torch.ops.compiled_llm.attention(q, k, v, layer_idx)
    return torch.ops.compiled_llm.attention(
        q, k, v, layer_idx, layer.sliding_window, layer.logits_soft_cap
    )
