"""Triton NeoX RoPE over all heads of a token per program, optionally after a per-head RMSNorm
(Qwen3's q/k norm). Rounding follows the model's eager code: cos/sin are cast to x's dtype, and
the normalized head is rounded before the weight multiply and again after it."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
    h = tl.arange(0, H_PAD)
    i = tl.arange(0, HALF_PAD)
    col = i < HALF
    mask = (h[:, None] < NUM_HEADS) & col[None, :]
    dtype = x_ptr.dtype.element_ty
    src = x_ptr + t * stride_xt + h[:, None] * stride_xh + i[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        ss = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)
        rstd = tl.rsqrt(ss / (2 * HALF) + eps)[:, None]
        w1 = tl.load(w_ptr + i, mask=col, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + HALF + i, mask=col, other=0.0).to(tl.float32)[None, :]
        x1 = (w1 * (x1 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        x2 = (w2 * (x2 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    c = tl.load(cos_ptr + t * stride_cos + i, mask=col, other=0.0).to(dtype).to(tl.float32)
    s = tl.load(sin_ptr + t * stride_sin + i, mask=col, other=0.0).to(dtype).to(tl.float32)
    y1 = x1 * c[None, :] - x2 * s[None, :]
    y2 = x2 * c[None, :] + x1 * s[None, :]
    dst = out_ptr + t * stride_ot + h[:, None] * stride_oh + i[None, :]
    tl.store(dst, y1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, y2.to(out_ptr.dtype.element_ty), mask=mask)


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
