"""KV-cache writes by slot mapping, plain and fused with RoPE.

Both kernels run one program per token and skip slots < 0 (padding), so they can be captured in a
CUDA graph at a padded token count: which tokens are written is data, not launch geometry. An FP8
(E4M3) cache gets keys and values saturated at +-448 (a per-tensor scale of 1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compiled_llm.kernels.pdl import launch_options, wait_for_previous
from compiled_llm.kernels.triton_rotary import load_halves, rope_cos_sin, rotate, store_halves


@triton.jit
def _slot_ptrs(cache_ptr, slot, h, d, stride_c_blk, stride_c_tok, stride_c_head, BLOCK_SIZE):
    """Pointers to heads `h` x dims `d` of the K half of cache slot `slot` (the V half is
    `stride_c_kv` further). A negative slot (padding) maps to slot 0; callers mask its stores."""
    blk = tl.maximum(slot, 0) // BLOCK_SIZE
    off = tl.maximum(slot, 0) % BLOCK_SIZE
    return cache_ptr + blk * stride_c_blk + off * stride_c_tok + h[:, None] * stride_c_head + d


@triton.jit
def _heads_to_store(slot, NUM_KV_HEADS: tl.constexpr):
    """All heads for a real slot, none for padding (slot < 0). Masks compare against this bound
    instead of AND-ing in the scalar `slot >= 0`: Triton's interpreter broadcasts a scalar
    comparison as an integer array, which its loads refuse as a mask from Triton 3.9 on."""
    return tl.where(slot >= 0, NUM_KV_HEADS, 0)


@triton.jit
def _to_cache(x, out_ty, SATURATE: tl.constexpr):
    """x rounded to the cache's dtype; an FP8 cache's values saturate at +-448 (E4M3's largest:
    a plain conversion makes NaN of what lies beyond)."""
    if SATURATE:
        x = tl.clamp(x.to(tl.float32), -448.0, 448.0)
    return x.to(out_ty)


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
    SATURATE: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, H_PAD)
    d = tl.arange(0, D_PAD)
    mask = (h[:, None] < _heads_to_store(slot, NUM_KV_HEADS)) & (d[None, :] < HEAD_DIM)
    dst = _slot_ptrs(
        cache_ptr, slot, h, d[None, :], stride_c_blk, stride_c_tok, stride_c_head, BLOCK_SIZE
    )
    k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    out_ty = cache_ptr.dtype.element_ty
    tl.store(dst, _to_cache(k, out_ty, SATURATE), mask=mask)
    tl.store(dst + stride_c_kv, _to_cache(v, out_ty, SATURATE), mask=mask)


# Per-step ints unspecialized: one compile for all batches, no JIT stall mid-run.
@triton.jit(do_not_specialize=["num_slots"])
def _rope_write_kv_kernel(
    q_ptr,
    q_out_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    cache_ptr,
    slot_ptr,
    num_slots,
    stride_qt,
    stride_qh,
    stride_qot,
    stride_qoh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cos,
    stride_sin,
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
    HAS_POSITIONS: tl.constexpr,  # cos/sin rows by positions[t] (a table), else by t
    K_IN_PLACE: tl.constexpr,  # also store the rotated k back into k
    SATURATE: tl.constexpr,  # an FP8 cache
    USE_PDL: tl.constexpr,
):
    wait_for_previous(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    row = tl.load(pos_ptr + t).to(tl.int64) if HAS_POSITIONS else t
    i = tl.arange(0, HALF_PAD)
    dtype = q_ptr.dtype.element_ty
    cos, sin = rope_cos_sin(cos_ptr, sin_ptr, row, stride_cos, stride_sin, dtype, HALF, HALF_PAD)
    q1, q2 = load_halves(q_ptr, t, stride_qt, stride_qh, NUM_HEADS, HQ_PAD, HALF, HALF_PAD)
    q1, q2 = rotate(q1, q2, cos, sin)
    store_halves(q_out_ptr, t, stride_qot, stride_qoh, q1, q2, NUM_HEADS, HQ_PAD, HALF, HALF_PAD)
    k1, k2 = load_halves(k_ptr, t, stride_kt, stride_kh, NUM_KV_HEADS, HKV_PAD, HALF, HALF_PAD)
    k1, k2 = rotate(k1, k2, cos, sin)
    if K_IN_PLACE:
        store_halves(k_ptr, t, stride_kt, stride_kh, k1, k2, NUM_KV_HEADS, HKV_PAD, HALF, HALF_PAD)
    slot = tl.load(slot_ptr + t, mask=t < num_slots, other=-1).to(tl.int64)
    h = tl.arange(0, HKV_PAD)
    mask = (h[:, None] < _heads_to_store(slot, NUM_KV_HEADS)) & (i[None, :] < HALF)
    dst = _slot_ptrs(
        cache_ptr, slot, h, i[None, :], stride_c_blk, stride_c_tok, stride_c_head, BLOCK_SIZE
    )
    out_ty = cache_ptr.dtype.element_ty
    tl.store(dst, _to_cache(k1, out_ty, SATURATE), mask=mask)
    tl.store(dst + HALF, _to_cache(k2, out_ty, SATURATE), mask=mask)
    v_src = v_ptr + t * stride_vt + h[:, None] * stride_vh + i[None, :]
    v1 = tl.load(v_src, mask=mask)
    v2 = tl.load(v_src + HALF, mask=mask)
    tl.store(dst + stride_c_kv, _to_cache(v1, out_ty, SATURATE), mask=mask)
    tl.store(dst + stride_c_kv + HALF, _to_cache(v2, out_ty, SATURATE), mask=mask)


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
        SATURATE=kv_cache.dtype == torch.float8_e4m3fn,
        num_warps=4,
        **launch_options(k.device),
    )


def _launch_rope_write_kv(
    q: torch.Tensor,
    q_out: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_in_place: bool,
) -> None:
    _check_cache(kv_cache, k)
    num_tokens, d = q.shape[0], q.shape[2]
    if d % 2 or cos.shape[-1] != d // 2 or sin.shape[-1] != d // 2:
        raise ValueError(
            f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} need a last dim of head_dim / 2 "
            f"(head_dim {d}, even)"
        )
    if q.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("q, cos and sin need a contiguous last dimension")
    if num_tokens == 0:
        return
    hq, hkv = q.shape[1], k.shape[1]
    _rope_write_kv_kernel[(num_tokens,)](
        q,
        q_out,
        k,
        v,
        slot_mapping if positions is None else positions,  # unread without positions
        cos,
        sin,
        kv_cache,
        slot_mapping,
        slot_mapping.shape[0],
        q.stride(0),
        q.stride(1),
        q_out.stride(0),
        q_out.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        cos.stride(0),
        sin.stride(0),
        *kv_cache.stride()[:4],
        NUM_HEADS=hq,
        HQ_PAD=triton.next_power_of_2(hq),
        NUM_KV_HEADS=hkv,
        HKV_PAD=triton.next_power_of_2(hkv),
        HALF=d // 2,
        HALF_PAD=triton.next_power_of_2(d // 2),
        BLOCK_SIZE=kv_cache.shape[2],
        HAS_POSITIONS=positions is not None,
        K_IN_PLACE=k_in_place,
        SATURATE=kv_cache.dtype == torch.float8_e4m3fn,
        num_warps=4,
        **launch_options(k.device),
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
    half = cos_sin_cache.shape[-1] // 2
    if cos_sin_cache.shape[-1] != q.shape[2]:
        raise ValueError(
            f"cos_sin_cache's last dim {cos_sin_cache.shape[-1]} must equal head_dim {q.shape[2]}"
        )
    cos, sin = cos_sin_cache[:, :half], cos_sin_cache[:, half:]
    _launch_rope_write_kv(q, q, k, v, positions, cos, sin, kv_cache, slot_mapping, True)
    return q, k


def rope_and_write_kv_per_token(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """RoPE with cos/sin already looked up per token ([T, D/2] each, as `RotaryEmbedding`
    returns them): writes the rotated k and v at their slots and returns the rotated q as a new
    contiguous tensor. q and k are left unchanged, so the op is functional in a graph.

    Same launch as `rope_and_write_kv`; the only allocation is q's output, sized by q's shape,
    so it is safe inside a CUDA graph.
    """
    if cos.shape[0] < q.shape[0] or sin.shape[0] < q.shape[0]:
        raise ValueError(f"cos/sin have fewer rows than q's {q.shape[0]} tokens")
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    _launch_rope_write_kv(q, q_out, k, v, None, cos, sin, kv_cache, slot_mapping, False)
    return q_out
