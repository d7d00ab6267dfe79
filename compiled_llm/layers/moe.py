"""Mixture of experts in plain PyTorch: the router's top-k and the experts' SwiGLU MLPs.

`select_experts` is the routing both native MoE families use (softmax over all experts in
float32, top-k, optionally renormalized over the chosen k). `experts_reference` runs the chosen
experts of each token and sums their outputs weighted by the routing weights; it is the CPU
implementation of `compiled_llm::fused_experts` (kernels/moe.py) and the oracle its Triton
kernel is tested against. Expert weights are stacked: `w13` [experts, 2 * inter, hidden] holds
each expert's gate rows then its up rows, `w2` [experts, hidden, inter] its down projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def select_experts(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights float32 [T, top_k], expert ids int64 [T, top_k]) of router logits [T, experts]:
    the top_k softmax probabilities, divided by their sum where `renormalize` (Mixtral always,
    Qwen3-MoE where norm_topk_prob; the same as a softmax over the top_k logits)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def experts_reference(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """sum_j topk_weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = topk_ids[t, j], for
    hidden [T, H]. Tokens are grouped by expert (experts in ascending order, as HF does); each
    expert's GEMMs round to hidden's dtype like a plain nn.Linear, the weighted sum runs in
    float32 and is rounded once."""
    num_tokens, top_k = topk_ids.shape
    inter = w2.shape[2]
    out = torch.zeros(num_tokens, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tokens = order // top_k
    weights = topk_weights.reshape(-1)[order].float()
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = tokens[start : start + count]
        gate_up = F.linear(hidden[rows], w13[expert])
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        down = F.linear(act, w2[expert])
        out.index_add_(0, rows, down.float() * weights[start : start + count, None])
        start += count
    return out.to(hidden.dtype)
