"""Prefill / extend attention over the paged KV cache: variable-length queries, causal with a
cached prefix, GQA.

Grid (query blocks, kv_heads). A program takes BLOCK_Q consecutive query tokens of one request and
all GROUP query heads of one KV head, stacked as BLOCK_M = BLOCK_Q * GROUP_PAD rows, so each K/V
tile feeds GROUP heads at once. Query token j of request i sits at position
seq_len_i - query_len_i + j. Request i owns query blocks starting at
query_start_loc[i] // BLOCK_Q + i, an upper bound that needs no per-step prefix sum: programs find
their request by binary search and programs past a request's last block exit. The grid therefore
depends only on (token count, request count), and a launch sized for padded counts is correct
for any batch that fits, which is what a captured CUDA graph needs. Handles decode rows too.

A sliding window (a query at position p sees keys p - window < j <= p) starts each program's key
loop at the first tile its earliest query sees and masks the tiles crossing either edge; a logits
soft-cap turns the scores into cap * tanh(scores / cap) before the softmax (`soft_cap`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def soft_cap(s, cap):
    """cap * tanh(s / cap) of natural-scale scores, returned in the log2 domain the kernels'
    softmax works in; tanh as 2 * sigmoid(2x) - 1, which saturates instead of overflowing."""
    return cap * (2.0 * tl.sigmoid(2.0 * s / cap) - 1.0) * 1.4426950408889634


@triton.jit
def _attend_tile(
    q,
    acc,
    m_i,
    l_i,
    k_base,
    bt_row,
    n0,
    pos,
    kv_end,
    qk_scale,
    window,
    cap,
    stride_c_blk,
    stride_c_kv,
    stride_c_tok,
    d,
    d_mask,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    SLIDING: tl.constexpr,
    SOFT_CAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    n = n0 + tl.arange(0, BLOCK_N)
    if MASKED:
        n_mask = n < kv_end
        page = tl.load(bt_row + n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        kv_mask = n_mask[:, None] & d_mask[None, :]
    else:
        page = tl.load(bt_row + n // BLOCK_SIZE).to(tl.int64)
        kv_mask = d_mask[None, :]
    tok = page * stride_c_blk + (n % BLOCK_SIZE) * stride_c_tok
    k = tl.load(k_base + tok[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if SOFT_CAP:
        s = soft_cap(s, cap)
    if MASKED:
        visible = n[None, :] <= pos[:, None]
        if SLIDING:
            visible = visible & (n[None, :] > pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = m_new
    if SLIDING:
        # A row may have seen no key yet (all left of its window): keep exp2 away from -inf - -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(k_base + stride_c_kv + tok[:, None] + d[None, :], mask=kv_mask, other=0.0)
    v = v.to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


# Per-step ints unspecialized: one compile for all batches, no JIT stall mid-run.
@triton.jit(do_not_specialize=["num_reqs", "stride_bt"])
def _prefill_kernel(
    q_ptr,
    cache_ptr,
    block_table_ptr,
    seq_lens_ptr,
    query_start_ptr,
    out_ptr,
    qk_scale,
    window,
    cap,
    num_reqs,
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
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SLIDING: tl.constexpr,
    SOFT_CAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Highest blocks first: within a request they have the most keys, so the tail stays short.
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    kvh = tl.program_id(1)

    # Last request whose first query block is <= pid.
    lo = 0
    hi = num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(query_start_ptr + mid) // BLOCK_Q + mid
        lo = tl.where(first <= pid, mid + 1, lo)
        hi = tl.where(first <= pid, hi, mid)
    req = lo - 1
    q_start = tl.load(query_start_ptr + req)
    q_len = tl.load(query_start_ptr + req + 1) - q_start
    tok0 = (pid - (q_start // BLOCK_Q + req)) * BLOCK_Q
    if tok0 < q_len:
        seq_len = tl.load(seq_lens_ptr + req)
        prefix = seq_len - q_len

        r = tl.arange(0, BLOCK_M)
        tok = tok0 + r // GROUP_PAD
        g = r % GROUP_PAD
        head = kvh * GROUP + g
        row_mask = (tok < q_len) & (g < GROUP)
        d = tl.arange(0, D_PAD)
        d_mask = d < HEAD_DIM
        mask = row_mask[:, None] & d_mask[None, :]
        tok_idx = (q_start + tok).to(tl.int64)
        q = tl.load(
            q_ptr + tok_idx[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
            mask=mask,
            other=0.0,
        )
        pos = prefix + tok

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        k_base = cache_ptr + kvh.to(tl.int64) * stride_c_head
        bt_row = block_table_ptr + tl.cast(req, tl.int64) * stride_bt

        # Keys every row of the block sees need no mask; the diagonal tiles do, and with a
        # window so do the tiles from the first one the earliest row sees to the first one the
        # last row sees whole: masked [lo, mid), unmasked [mid, full_end), masked to the end.
        first_pos = prefix + tok0
        last_pos = prefix + tl.minimum(tok0 + BLOCK_Q, q_len) - 1
        full_end = ((first_pos + 1) // BLOCK_N) * BLOCK_N
        lo = 0
        mid = 0
        if SLIDING:
            lo = (tl.maximum(first_pos - window + 1, 0) // BLOCK_N) * BLOCK_N
            # lo <= mid <= full_end: the earliest row's window starts no later than the last's
            mid = tl.minimum(
                tl.cdiv(tl.maximum(last_pos - window + 1, 0), BLOCK_N) * BLOCK_N, full_end
            )
            for n0 in range(lo, mid, BLOCK_N):
                acc, m_i, l_i = _attend_tile(
                    q, acc, m_i, l_i, k_base, bt_row, n0, pos, last_pos + 1, qk_scale, window, cap,
                    stride_c_blk, stride_c_kv, stride_c_tok, d, d_mask,
                    BLOCK_SIZE, BLOCK_N, True, SLIDING, SOFT_CAP, DOT_PRECISION,
                )  # fmt: skip
        for n0 in range(mid, full_end, BLOCK_N):
            acc, m_i, l_i = _attend_tile(
                q, acc, m_i, l_i, k_base, bt_row, n0, pos, last_pos + 1, qk_scale, window, cap,
                stride_c_blk, stride_c_kv, stride_c_tok, d, d_mask,
                BLOCK_SIZE, BLOCK_N, False, SLIDING, SOFT_CAP, DOT_PRECISION,
            )  # fmt: skip
        for n0 in range(full_end, last_pos + 1, BLOCK_N):
            acc, m_i, l_i = _attend_tile(
                q, acc, m_i, l_i, k_base, bt_row, n0, pos, last_pos + 1, qk_scale, window, cap,
                stride_c_blk, stride_c_kv, stride_c_tok, d, d_mask,
                BLOCK_SIZE, BLOCK_N, True, SLIDING, SOFT_CAP, DOT_PRECISION,
            )  # fmt: skip

        o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + tok_idx[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=mask,
        )


def prefill_block_q(group: int, block_m: int) -> int:
    """Query tokens per program: BLOCK_M rows hold BLOCK_Q tokens x GROUP_PAD heads."""
    return max(1, block_m // triton.next_power_of_2(group))


def prefill_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    num_reqs: int,
    num_tokens: int,
    block_m: int = 128,
    block_n: int = 64,
    num_warps: int = 8,
    num_stages: int = 2,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
) -> None:
    """Causal attention for `num_reqs` packed requests (bounds; padded entries must have zero
    query length) over at most `num_tokens` query rows, windowed and soft-capped where given."""
    if num_reqs == 0 or num_tokens == 0:
        return
    hq, d = q.shape[1], q.shape[2]
    hkv = kv_cache.shape[3]
    group = hq // hkv
    group_pad = triton.next_power_of_2(group)
    block_q = prefill_block_q(group, block_m)
    num_blocks = triton.cdiv(num_tokens, block_q) + num_reqs
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _prefill_kernel[(num_blocks, hkv)](
        q,
        kv_cache,
        block_table,
        seq_lens,
        query_start_loc,
        out,
        scale if logits_soft_cap else scale * LOG2E,  # soft_cap() goes to log2 itself
        sliding_window or 0,
        logits_soft_cap or 1.0,
        num_reqs,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        *kv_cache.stride()[:4],
        block_table.stride(0),
        GROUP=group,
        GROUP_PAD=group_pad,
        HEAD_DIM=d,
        D_PAD=triton.next_power_of_2(d),
        BLOCK_SIZE=kv_cache.shape[2],
        BLOCK_Q=block_q,
        BLOCK_M=block_q * group_pad,
        BLOCK_N=block_n,
        SLIDING=sliding_window is not None,
        SOFT_CAP=logits_soft_cap is not None,
        DOT_PRECISION=precision,
        num_warps=num_warps,
        num_stages=num_stages,
    )
