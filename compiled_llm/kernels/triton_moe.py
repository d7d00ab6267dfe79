"""Triton fused experts: the (token, slot) pairs sorted by expert into blocks of BLOCK_M rows
(each block one expert's, padded with a sentinel row), then one grouped GEMM launch per
projection: gate/up [T * top_k, 2I] = x[token] @ w13[e]^T, SiLU-and-mul, down [T * top_k, H] =
act @ w2[e]^T times the routing weight, and a float32 sum over the top_k slots per token.

Nothing here waits on the device (no `.item()`, no data-dependent shapes): the sort is sized by
T * top_k and a bound on the padding, so the op can be captured in a CUDA graph. A block past
the last expert's rows carries the expert id `num_experts` and its programs return at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from compiled_llm.kernels.triton_activation import silu_and_mul


# Per-step ints unspecialized: one compile for all batches, no JIT stall mid-run.
@triton.jit(do_not_specialize=["num_rows", "num_blocks_m"])
def _expert_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    weight_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    N,
    K,
    num_rows,
    num_experts,
    num_blocks_m,
    stride_am,
    stride_ak,
    stride_be,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    A_ROWS_PER_ID: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """c[id] = a[id // A_ROWS_PER_ID] @ b[expert]^T (times weight[id]) for the ids of one block.

    Row ids index the flat (token, slot) pairs; a sentinel id (num_rows) pads a block and is
    neither read nor written. Programs are ordered in groups of GROUP_M row blocks so that
    neighbouring blocks of one expert reuse its weight tile from L2.
    """
    pid = tl.program_id(0)
    num_blocks_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_blocks_n
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size

    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert >= num_experts:
        return
    ids = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_mask = ids < num_rows
    a_rows = (ids // A_ROWS_PER_ID).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if MUL_WEIGHT:
        w = tl.load(weight_ptr + ids, mask=row_mask, other=0.0)
        acc = acc * w[:, None]
    c_ptrs = c_ptr + ids.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


def gemm_config(num_rows: int, num_experts: int, dtype: torch.dtype) -> GemmConfig:
    """Tiles by the mean rows per expert: decode-sized batches (a few rows an expert) take
    16-row blocks so little of each block is padding, prefill-sized ones 64-row blocks.
    Untuned starting points; 4-byte dtypes get fewer pipeline stages (shared memory)."""
    stages = 2 if dtype.itemsize >= 4 else 4
    if num_rows <= 16 * num_experts:
        return GemmConfig(16, 64, 128, 1, 4, stages)
    return GemmConfig(64, 128, 64, 8, 8, min(stages, 3))


@dataclass(frozen=True)
class ExpertBlocks:
    """(token, slot) rows sorted by expert into blocks of `block_m`: `sorted_ids` [blocks *
    block_m] (int32 flat row ids, `num_rows` where padding), `block_expert` [blocks] (int32,
    `num_experts` for blocks past the last expert's)."""

    sorted_ids: torch.Tensor
    block_expert: torch.Tensor
    num_rows: int
    block_m: int


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertBlocks:
    """Group the flat rows of topk_ids [T, top_k] by expert, each expert's run padded to a
    multiple of block_m. Sized without reading the ids: each expert with rows wastes under one
    block, so cdiv(rows, block_m) + min(rows, experts) blocks always suffice."""
    flat = topk_ids.reshape(-1)
    num_rows = flat.numel()
    device = flat.device
    num_blocks = triton.cdiv(num_rows, block_m) + min(num_rows, num_experts)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    sorted_experts, order = torch.sort(flat, stable=True)
    rank = (
        torch.arange(num_rows, device=device) - (torch.cumsum(counts, 0) - counts)[sorted_experts]
    )
    dest = (padded_end - padded)[sorted_experts] + rank
    sorted_ids = torch.full((num_blocks * block_m,), num_rows, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    starts = torch.arange(num_blocks, device=device) * block_m
    block_expert = torch.searchsorted(padded_end, starts, right=True).to(torch.int32)
    return ExpertBlocks(sorted_ids, block_expert, num_rows, block_m)


def _grouped_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    blocks: ExpertBlocks,
    cfg: GemmConfig,
    a_rows_per_id: int,
    weights: torch.Tensor | None,
) -> None:
    """out[id] = a[id // a_rows_per_id] @ b[expert of id]^T (* weights[id]): one launch."""
    n, k = b.shape[1], b.shape[2]
    num_blocks_m = blocks.block_expert.numel()
    grid = (num_blocks_m * triton.cdiv(n, cfg.block_n),)
    _expert_gemm_kernel[grid](
        a,
        b,
        out,
        weights if weights is not None else out,
        blocks.sorted_ids,
        blocks.block_expert,
        n,
        k,
        blocks.num_rows,
        b.shape[0],
        num_blocks_m,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        b.stride(2),
        out.stride(0),
        out.stride(1),
        A_ROWS_PER_ID=a_rows_per_id,
        MUL_WEIGHT=weights is not None,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def fused_experts(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """layers/moe.experts_reference's result (up to GEMM rounding) on the device; shapes checked
    by the op (kernels/moe.py)."""
    num_tokens, top_k = topk_ids.shape
    num_experts, two_inter, hidden_size = w13.shape
    if num_tokens == 0:
        return torch.empty_like(hidden)
    num_rows = num_tokens * top_k
    cfg = gemm_config(num_rows, num_experts, hidden.dtype)
    blocks = sort_by_expert(topk_ids, num_experts, cfg.block_m)
    gate_up = torch.empty(num_rows, two_inter, dtype=hidden.dtype, device=hidden.device)
    _grouped_gemm(hidden, w13, gate_up, blocks, cfg, top_k, None)
    inter = two_inter // 2
    act = silu_and_mul(gate_up[:, :inter], gate_up[:, inter:])
    down = torch.empty(num_rows, hidden_size, dtype=hidden.dtype, device=hidden.device)
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    _grouped_gemm(act, w2, down, blocks, cfg, 1, weights)
    return (
        down.view(num_tokens, top_k, hidden_size).sum(dim=1, dtype=torch.float32).to(hidden.dtype)
    )
