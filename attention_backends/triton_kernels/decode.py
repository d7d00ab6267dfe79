"""Decode attention (one query token per request) with split-KV, flash-decoding style.

Grid (requests, kv_heads, splits). Each program attends the GROUP query heads that share one KV
head over one contiguous slice of the request's context, so every K/V byte is read once per step.
Split s covers ceil(ceil(seq_len / S) / BLOCK_N) tiles: the split count S is launch geometry
(fixed when captured in a CUDA graph) while each request's slice size follows its length, so a
graph is correct for any context length. With S > 1 each split writes a normalised partial output
and its log-sum-exp, and the last of a (request, KV head)'s splits to finish merges them
(kernels/split_locks.py); with S == 1 the output is written directly.
Requests with seq_len 0 (padding of a captured batch) produce zeros. With a sliding window the
splits share out only the keys the query sees, the last `window` of the request's; a logits
soft-cap goes through `prefill.soft_cap`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compiled_llm.attention_backends.triton_kernels.prefill import LOG2E, soft_cap
from compiled_llm.kernels.pdl import launch_options, wait_for_previous
from compiled_llm.kernels.split_locks import last_to_arrive, release


# Per-step ints unspecialized: one compile for all batches, no JIT stall mid-run.
@triton.jit(do_not_specialize=["stride_bt"])
def _decode_split_kernel(
    q_ptr,
    cache_ptr,
    block_table_ptr,
    seq_lens_ptr,
    out_ptr,
    part_o_ptr,
    part_lse_ptr,
    lock_ptr,  # split-KV: one int32 lock per (request, KV head), zero
    qk_scale,
    window,
    cap,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_c_blk,
    stride_c_kv,
    stride_c_tok,
    stride_c_head,
    stride_bt,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    SLIDING: tl.constexpr,
    SOFT_CAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous(USE_PDL)
    req = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    num_q_heads = tl.num_programs(1) * GROUP

    seq_len = tl.load(seq_lens_ptr + req)
    first = 0
    if SLIDING:  # the query, at position seq_len - 1, sees keys > seq_len - 1 - window
        first = tl.maximum(seq_len - window, 0)
    chunk = tl.cdiv(tl.cdiv(seq_len - first, num_splits), BLOCK_N) * BLOCK_N
    start = first + split * chunk
    end = tl.minimum(start + chunk, seq_len)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D_PAD)
    heads = kvh * GROUP + g
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    q = tl.load(
        q_ptr + req * stride_qt + heads[:, None] * stride_qh + d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    k_base = cache_ptr + kvh * stride_c_head
    bt_row = block_table_ptr + req * stride_bt
    for n0 in range(start, end, BLOCK_N):
        n = n0 + offs_n
        n_mask = n < end
        page = tl.load(bt_row + n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        tok = page * stride_c_blk + (n % BLOCK_SIZE) * stride_c_tok
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + tok[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if SOFT_CAP:
            s = soft_cap(s, cap)
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(k_base + stride_c_kv + tok[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = v.to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has_keys = l_i > 0.0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    mask = g_mask[:, None] & d_mask[None, :]
    dst = out_ptr + req * stride_ot + heads[:, None] * stride_oh + d[None, :]
    if SINGLE_SPLIT:
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # partials: o [R, Hq, S, D] and lse [R, Hq, S], float32, log2 domain
        rows = (req * num_q_heads + heads) * num_splits
        tl.store(part_o_ptr + (rows + split)[:, None] * HEAD_DIM + d[None, :], o, mask=mask)
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + rows + split, lse, mask=g_mask)
        lock = lock_ptr + req * tl.num_programs(1) + kvh
        if last_to_arrive(lock, num_splits):
            _merge_splits(
                part_o_ptr, part_lse_ptr, rows, num_splits, dst, mask, g_mask, d, HEAD_DIM
            )
            release(lock)


@triton.jit
def _merge_splits(part_o_ptr, part_lse_ptr, rows, num_splits, dst, mask, g_mask, d, HEAD_DIM):
    """out = sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max lse), summed in split order;
    zeros for a head no split saw a key of."""
    m = tl.full(rows.shape, float("-inf"), tl.float32)
    for s in range(0, num_splits):
        m = tl.maximum(m, tl.load(part_lse_ptr + rows + s, mask=g_mask, other=float("-inf")))
    m = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros(rows.shape, tl.float32)
    acc = tl.zeros(mask.shape, tl.float32)
    for s in range(0, num_splits):
        w = tl.exp2(tl.load(part_lse_ptr + rows + s, mask=g_mask, other=float("-inf")) - m)
        o = tl.load(part_o_ptr + (rows + s)[:, None] * HEAD_DIM + d[None, :], mask=mask, other=0.0)
        acc += o * w[:, None]
        total += w
    res = acc / tl.where(total > 0.0, total, 1.0)[:, None]
    tl.store(dst, res.to(dst.dtype.element_ty), mask=mask)


def partial_numel(num_reqs: int, num_heads: int, head_dim: int, num_splits: int) -> int:
    """Float32 elements of scratch a split-KV launch needs (outputs then log-sum-exps)."""
    if num_splits <= 1:
        return 0
    rows = num_reqs * num_heads * num_splits
    return rows * head_dim + rows


def decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    num_reqs: int,
    num_splits: int,
    scratch: torch.Tensor | None,
    locks: torch.Tensor | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
) -> None:
    """Attention of one query token per request (row i of q is request i) for `num_reqs` rows,
    windowed and soft-capped where given.

    When num_splits > 1, `scratch` is a float32 buffer of at least `partial_numel(...)` elements
    and `locks` an int32 buffer of at least num_reqs x KV heads zeros (left zero).
    """
    if num_reqs == 0:
        return
    hq, d = q.shape[1], q.shape[2]
    hkv = kv_cache.shape[3]
    group = hq // hkv
    single = num_splits <= 1
    if single:
        part_o = part_lse = locks = out  # unused by the kernel
    else:
        need = partial_numel(num_reqs, hq, d, num_splits)
        if scratch is None or scratch.numel() < need:
            raise ValueError(f"split-KV decode needs {need} float32 scratch elements")
        if locks is None or locks.numel() < num_reqs * hkv or locks.dtype != torch.int32:
            raise ValueError(f"split-KV decode needs {num_reqs * hkv} int32 locks")
        rows = num_reqs * hq * num_splits
        part_o, part_lse = scratch[: rows * d], scratch[rows * d : rows * d + rows]
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _decode_split_kernel[(num_reqs, hkv, max(num_splits, 1))](
        q,
        kv_cache,
        block_table,
        seq_lens,
        out,
        part_o,
        part_lse,
        locks,
        scale if logits_soft_cap else scale * LOG2E,  # soft_cap() goes to log2 itself
        sliding_window or 0,
        logits_soft_cap or 1.0,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        *kv_cache.stride()[:4],
        block_table.stride(0),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=d,
        D_PAD=triton.next_power_of_2(d),
        BLOCK_SIZE=kv_cache.shape[2],
        BLOCK_N=block_n,
        SINGLE_SPLIT=single,
        SLIDING=sliding_window is not None,
        SOFT_CAP=logits_soft_cap is not None,
        DOT_PRECISION=precision,
        num_warps=num_warps,
        num_stages=num_stages,
        **launch_options(q.device),
    )
