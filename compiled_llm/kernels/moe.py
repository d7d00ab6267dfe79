"""`compiled_llm::fused_experts(hidden, w13, w2, topk_weights, topk_ids)`: a mixture-of-experts
layer's expert MLPs for already-routed tokens (layers/moe.py has the routing and the semantics).

One opaque op to the compiler: its output has hidden's shape and dtype (the fake impl), so a
decoder layer holding it traces and compiles like any other, once for all identical layers. On
CPU it is layers/moe.experts_reference; on CUDA the Triton grouped GEMMs of triton_moe.py (tokens
sorted by expert, one launch per projection).
"""

from __future__ import annotations

import torch

from compiled_llm.layers.moe import experts_reference

_LIB = torch.library.Library("compiled_llm", "FRAGMENT")
_LIB.define(
    "fused_experts(Tensor hidden, Tensor w13, Tensor w2, Tensor topk_weights, Tensor topk_ids)"
    " -> Tensor"
)


def check_shapes(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> None:
    """ValueError naming the argument whose shape does not fit the others."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [tokens, hidden], got {tuple(hidden.shape)}")
    if w13.dim() != 3 or w13.shape[2] != hidden.shape[1] or w13.shape[1] % 2:
        raise ValueError(
            f"w13 must be [experts, 2 * intermediate, {hidden.shape[1]}], got {tuple(w13.shape)}"
        )
    expected_w2 = (w13.shape[0], hidden.shape[1], w13.shape[1] // 2)
    if tuple(w2.shape) != expected_w2:
        raise ValueError(f"w2 must be {expected_w2}, got {tuple(w2.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"topk_ids must be [{hidden.shape[0]}, top_k], got {tuple(topk_ids.shape)}"
        )
    if not hidden.dtype == w13.dtype == w2.dtype:
        raise ValueError(
            f"hidden ({hidden.dtype}), w13 ({w13.dtype}) and w2 ({w2.dtype}) differ in dtype"
        )
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_weights {tuple(topk_weights.shape)} and topk_ids {tuple(topk_ids.shape)} "
            "differ in shape"
        )


@torch.library.register_fake("compiled_llm::fused_experts", lib=_LIB)
def _fused_experts_fake(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    return hidden.new_empty(hidden.shape)


def _fused_experts_cpu(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    check_shapes(hidden, w13, w2, topk_weights, topk_ids)
    return experts_reference(hidden, w13, w2, topk_weights, topk_ids)


def _fused_experts_cuda(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    from compiled_llm.kernels.triton_moe import fused_experts

    check_shapes(hidden, w13, w2, topk_weights, topk_ids)
    return fused_experts(hidden, w13, w2, topk_weights, topk_ids)


_LIB.impl("fused_experts", _fused_experts_cpu, "CPU")
_LIB.impl("fused_experts", _fused_experts_cuda, "CUDA")


def fused_experts(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """The op, for models to call: [T, H] out of hidden [T, H] and its routing [T, top_k]."""
    out: torch.Tensor = torch.ops.compiled_llm.fused_experts(
        hidden, w13, w2, topk_weights, topk_ids
    )
    return out
