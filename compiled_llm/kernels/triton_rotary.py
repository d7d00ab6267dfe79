"""Triton NeoX RoPE over all heads of a token per program, optionally after a per-head RMSNorm
(Qwen3's q/k norm). Rounding follows the model's eager code: cos/sin are cast to x's dtype, and
the normalized head is rounded before the weight multiply and again after it.

The jit helpers (`rope_cos_sin`, `load_halves`, `rotate`, `store_halves`) are the one RoPE of
our Triton code: the attention backends' fused RoPE + KV write uses them too."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def rope_cos_sin(
    cos_ptr,
    sin_ptr,
    row,
    stride_cos,
    stride_sin,
    dtype: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
):
    """Row `row` of the cos and sin tables [HALF_PAD] in float32, rounded to the activations'
    dtype first, as layers/rotary.py's `.to(x.dtype)` does."""
    i = tl.arange(0, HALF_PAD)
    c = tl.load(cos_ptr + row * stride_cos + i, mask=i < HALF, other=0.0).to(dtype)
    s = tl.load(sin_ptr + row * stride_sin + i, mask=i < HALF, other=0.0).to(dtype)
    return c.to(tl.float32), s.to(tl.float32)


@triton.jit
def _first_halves(
    t,
    stride_t,
    stride_h,
    NUM_HEADS: tl.constexpr,
    H_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
):
    """Element offsets [H_PAD, HALF_PAD] of the first half of every head of token t (the second
    half is HALF further), and the mask of the real heads and dims."""
    h = tl.arange(0, H_PAD)
    i = tl.arange(0, HALF_PAD)
    mask = (h[:, None] < NUM_HEADS) & (i[None, :] < HALF)
    return t * stride_t + h[:, None] * stride_h + i[None, :], mask


@triton.jit
def load_halves(
    x_ptr,
    t,
    stride_t,
    stride_h,
    NUM_HEADS: tl.constexpr,
    H_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
):
    """The two halves [H_PAD, HALF_PAD] of every head of token t, in float32 (NeoX split)."""
    offsets, mask = _first_halves(t, stride_t, stride_h, NUM_HEADS, H_PAD, HALF, HALF_PAD)
    src = x_ptr + offsets
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    return x1, x2


@triton.jit
def rotate(x1, x2, cos, sin):
    return x1 * cos[None, :] - x2 * sin[None, :], x2 * cos[None, :] + x1 * sin[None, :]


@triton.jit
def store_halves(
    out_ptr,
    t,
    stride_t,
    stride_h,
    y1,
    y2,
    NUM_HEADS: tl.constexpr,
    H_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
):
    """Store the halves `load_halves` read (in out_ptr's dtype; out_ptr may be x_ptr)."""
    offsets, mask = _first_halves(t, stride_t, stride_h, NUM_HEADS, H_PAD, HALF, HALF_PAD)
    dst = out_ptr + offsets
    tl.store(dst, y1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, y2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    x_ptr,
    w_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    stride_xt,
    stride_xh,
    stride_ot,
    stride_oh,
    stride_cos,
    stride_sin,
    eps,
    NUM_HEADS: tl.constexpr,
    H_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    NORM: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    dtype = x_ptr.dtype.element_ty
    x1, x2 = load_halves(x_ptr, t, stride_xt, stride_xh, NUM_HEADS, H_PAD, HALF, HALF_PAD)
    if NORM:
        i = tl.arange(0, HALF_PAD)
        col = i < HALF
        ss = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)
        rstd = tl.rsqrt(ss / (2 * HALF) + eps)[:, None]
        w1 = tl.load(w_ptr + i, mask=col, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + HALF + i, mask=col, other=0.0).to(tl.float32)[None, :]
        x1 = (w1 * (x1 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        x2 = (w2 * (x2 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    c, s = rope_cos_sin(cos_ptr, sin_ptr, t, stride_cos, stride_sin, dtype, HALF, HALF_PAD)
    y1, y2 = rotate(x1, x2, c, s)
    store_halves(out_ptr, t, stride_ot, stride_oh, y1, y2, NUM_HEADS, H_PAD, HALF, HALF_PAD)


def rotary(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 0.0,
) -> torch.Tensor:
    """RoPE of x [T, heads, D] by cos/sin [T, D/2]; with `weight`, RMSNorm each head first."""
    num_tokens, heads, d = x.shape
    dtype = x.dtype if weight is None else torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    if num_tokens == 0:
        return out
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    half = d // 2
    w = weight.contiguous() if weight is not None else x  # unused without NORM
    _rope_kernel[(num_tokens,)](
        x,
        w,
        cos,
        sin,
        out,
        x.stride(0),
        x.stride(1),
        out.stride(0),
        out.stride(1),
        cos.stride(0),
        sin.stride(0),
        eps,
        NUM_HEADS=heads,
        H_PAD=triton.next_power_of_2(heads),
        HALF=half,
        HALF_PAD=triton.next_power_of_2(half),
        NORM=weight is not None,
        num_warps=4,
    )
    return out
