"""KV-cache writes by slot mapping, plain and fused with RoPE.

Both kernels run one program per token and skip slots < 0 (padding), so they can be captured in a
CUDA graph at a padded token count: which tokens are written is data, not launch geometry.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_c_blk,
    stride_c_kv,
    stride_c_tok,
    stride_c_head,
    NUM_KV_HEADS: tl.constexpr,
    H_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, H_PAD)
    d = tl.arange(0, D_PAD)
    mask = (h[:, None] < NUM_KV_HEADS) & (d[None, :] < HEAD_DIM) & (slot >= 0)
    blk = tl.maximum(slot, 0) // BLOCK_SIZE
    off = tl.maximum(slot, 0) % BLOCK_SIZE
    dst = (
        cache_ptr
        + blk * stride_c_blk
        + off * stride_c_tok
        + h[:, None] * stride_c_head
        + d[None, :]
    )
    k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_c_kv, v.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_heads(
    x_ptr,
    t,
    stride_t,
    stride_h,
    cos,
    sin,
    NUM_HEADS: tl.constexpr,
    H_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
):
    """Rotate all heads of token t in place (NeoX half split) and return the rotated halves."""
    h = tl.arange(0, H_PAD)
    i = tl.arange(0, HALF_PAD)
    mask = (h[:, None] < NUM_HEADS) & (i[None, :] < HALF)
    ptr1 = x_ptr + t * stride_t + h[:, None] * stride_h + i[None, :]
    x1 = tl.load(ptr1, mask=mask).to(tl.float32)
    x2 = tl.load(ptr1 + HALF, mask=mask).to(tl.float32)
    y1 = x1 * cos[None, :] - x2 * sin[None, :]
    y2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(ptr1, y1.to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(ptr1 + HALF, y2.to(x_ptr.dtype.element_ty), mask=mask)
    return y1, y2


@triton.jit
def _rope_write_kv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    cos_sin_ptr,
    cache_ptr,
    slot_ptr,
    num_slots,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cs,
    stride_c_blk,
    stride_c_kv,
    stride_c_tok,
    stride_c_head,
    NUM_HEADS: tl.constexpr,
    HQ_PAD: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HKV_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    i = tl.arange(0, HALF_PAD)
    cos = tl.load(cos_sin_ptr + pos * stride_cs + i, mask=i < HALF, other=0.0).to(tl.float32)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + i, mask=i < HALF, other=0.0)
    sin = sin.to(tl.float32)
    _rope_heads(q_ptr, t, stride_qt, stride_qh, cos, sin, NUM_HEADS, HQ_PAD, HALF, HALF_PAD)
    k1, k2 = _rope_heads(
        k_ptr, t, stride_kt, stride_kh, cos, sin, NUM_KV_HEADS, HKV_PAD, HALF, HALF_PAD
    )
    slot = tl.load(slot_ptr + t, mask=t < num_slots, other=-1).to(tl.int64)
    h = tl.arange(0, HKV_PAD)
    mask = (h[:, None] < NUM_KV_HEADS) & (i[None, :] < HALF) & (slot >= 0)
    blk = tl.maximum(slot, 0) // BLOCK_SIZE
    off = tl.maximum(slot, 0) % BLOCK_SIZE
    dst = (
        cache_ptr
        + blk * stride_c_blk
        + off * stride_c_tok
        + h[:, None] * stride_c_head
        + i[None, :]
    )
    out_ty = cache_ptr.dtype.element_ty
    tl.store(dst, k1.to(out_ty), mask=mask)
    tl.store(dst + HALF, k2.to(out_ty), mask=mask)
    v_src = v_ptr + t * stride_vt + h[:, None] * stride_vh + i[None, :]
    v1 = tl.load(v_src, mask=mask)
    v2 = tl.load(v_src + HALF, mask=mask)
    tl.store(dst + stride_c_kv, v1.to(out_ty), mask=mask)
    tl.store(dst + stride_c_kv + HALF, v2.to(out_ty), mask=mask)


def _check_cache(kv_cache: torch.Tensor, k: torch.Tensor) -> None:
    if kv_cache.dim() != 5 or kv_cache.shape[1] != 2 or kv_cache.shape[3:] != k.shape[1:]:
        raise ValueError(
            f"kv_cache {tuple(kv_cache.shape)} is not [num_blocks, 2, block_size, "
            f"{k.shape[1]}, {k.shape[2]}]"
        )
    if kv_cache.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("kv_cache and k/v need a contiguous last (head_dim) dimension")


def write_kv(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store k, v ([T, Hkv, D]) at `slot_mapping` ([>= T], -1 = skip) in the NHD paged cache."""
    _check_cache(kv_cache, k)
    num_tokens = min(k.shape[0], slot_mapping.shape[0])
    if num_tokens == 0:
        return
    hkv, d = k.shape[1], k.shape[2]
    _write_kv_kernel[(num_tokens,)](
        k,
        v,
        kv_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        *kv_cache.stride()[:4],
        NUM_KV_HEADS=hkv,
        H_PAD=triton.next_power_of_2(hkv),
        HEAD_DIM=d,
        D_PAD=triton.next_power_of_2(d),
        BLOCK_SIZE=kv_cache.shape[2],
        num_warps=4,
    )


def rope_and_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k in place (NeoX half split, `cos_sin_cache` = [max_pos, D] = cat(cos, sin))
    and write the rotated k and v at their slots; returns (q, k).

    One launch instead of RoPE's elementwise kernels plus the write: q and k are read and written
    once. Tokens past `slot_mapping`'s length or with slot -1 are rotated but not stored.
    """
    _check_cache(kv_cache, k)
    num_tokens, d = q.shape[0], q.shape[2]
    if cos_sin_cache.shape[-1] != d or d % 2:
        raise ValueError(
            f"cos_sin_cache's last dim {cos_sin_cache.shape[-1]} must equal head_dim {d} (even)"
        )
    if q.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("q and cos_sin_cache need a contiguous last dimension")
    if num_tokens == 0:
        return q, k
    hq, hkv = q.shape[1], k.shape[1]
    _rope_write_kv_kernel[(num_tokens,)](
        q,
        k,
        v,
        positions,
        cos_sin_cache,
        kv_cache,
        slot_mapping,
        slot_mapping.shape[0],
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        cos_sin_cache.stride(0),
        *kv_cache.stride()[:4],
        NUM_HEADS=hq,
        HQ_PAD=triton.next_power_of_2(hq),
        NUM_KV_HEADS=hkv,
        HKV_PAD=triton.next_power_of_2(hkv),
        HALF=d // 2,
        HALF_PAD=triton.next_power_of_2(d // 2),
        BLOCK_SIZE=kv_cache.shape[2],
        num_warps=4,
    )
    return q, k
