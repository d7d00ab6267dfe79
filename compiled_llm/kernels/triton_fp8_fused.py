"""Triton RMSNorm (+ residual add) and SiLU-and-mul, each ending in the FP8 quantization of its
output: one program per row holds the row in registers as [groups, group] tiles, so the output
is rounded as the model rounds it, reduced to one amax per group and written once, in E4M3.

Roundings follow the unfused ops: the residual sum in the input dtype, the normalized row in the
input dtype before the weight multiply, the norm's (or silu * up's) output in its own dtype
before its amax; quantization as in kernels/fp8.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compiled_llm.kernels.fp8 import FP8_DTYPE, FP8_MAX, MIN_SCALE
from compiled_llm.kernels.pdl import launch_options, wait_for_previous

# Globals a kernel reads must be constexprs.
_FP8_MAX = tl.constexpr(FP8_MAX)
_MIN_SCALE = tl.constexpr(MIN_SCALE)

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _quantize_tile(y, q_ptr, s_ptr, cols, mask, n_groups, NG: tl.constexpr):
    """Store y's [NG, G] tile in E4M3 with one scale per group (a row of the tile)."""
    amax = tl.max(tl.abs(y), axis=1)
    # div_rn: Triton's `/` on float32 is approximate, the reference's division is not.
    scale = tl.maximum(tl.math.div_rn(amax, _FP8_MAX), _MIN_SCALE)
    groups = tl.arange(0, NG)
    tl.store(s_ptr + groups, scale, mask=groups < n_groups)
    q = tl.clamp(tl.math.div_rn(y, scale[:, None]), -_FP8_MAX, _FP8_MAX)
    tl.store(q_ptr + cols, q.to(q_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_quant_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    q_ptr,
    s_ptr,
    res_out_ptr,
    stride_x,
    stride_res,
    stride_q,
    stride_s,
    stride_res_out,
    n_cols,
    group_size,
    n_groups,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    NORM_DTYPE: tl.constexpr,  # the unfused norm's output dtype (promoted x and weight)
    NG: tl.constexpr,
    G: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, NG)[:, None]
    c = tl.arange(0, G)[None, :]
    cols = g * group_size + c
    mask = (c < group_size) & (cols < n_cols)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=mask)
    h = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(tl.sum(h * h, axis=1), axis=0) / n_cols + eps)
    y = (h * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = (w * y).to(NORM_DTYPE).to(tl.float32)
    _quantize_tile(out, q_ptr + row * stride_q, s_ptr + row * stride_s, cols, mask, n_groups, NG)


@triton.jit
def _silu_and_mul_quant_kernel(
    gate_ptr,
    up_ptr,
    q_ptr,
    s_ptr,
    stride_gate,
    stride_up,
    stride_q,
    stride_s,
    n_cols,
    group_size,
    n_groups,
    OUT_DTYPE: tl.constexpr,  # silu(gate) * up's dtype
    NG: tl.constexpr,
    G: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, NG)[:, None]
    c = tl.arange(0, G)[None, :]
    cols = g * group_size + c
    mask = (c < group_size) & (cols < n_cols)
    gate = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    s = (gate * tl.sigmoid(gate)).to(gate_ptr.dtype.element_ty).to(tl.float32)
    out = (s * up).to(OUT_DTYPE).to(tl.float32)
    _quantize_tile(out, q_ptr + row * stride_q, s_ptr + row * stride_s, cols, mask, n_groups, NG)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _layout(n: int, group_size: int) -> tuple[int, int, int, int]:
    """(group width, groups, NG, G): per token (group_size 0) one group of the whole row."""
    width = n if group_size == 0 else group_size
    groups = triton.cdiv(n, width)
    G = triton.next_power_of_2(width)
    return width, groups, triton.next_power_of_2(groups), G


def rms_norm_quant(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    group_size: int,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    m, n = x.shape
    if weight.shape != (n,):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({n},)")
    width, groups, ng, g = _layout(n, group_size)
    q = torch.empty((m, n), dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((m, groups), dtype=torch.float32, device=x.device)
    res_out = torch.empty_like(x) if residual is not None else None
    if m == 0:
        return q, s, res_out
    x = _rows(x)
    r = _rows(residual) if residual is not None else x
    ro = res_out if res_out is not None else x
    _rms_norm_quant_kernel[(m,)](
        x,
        r,
        weight.contiguous(),
        q,
        s,
        ro,
        x.stride(0),
        r.stride(0),
        q.stride(0),
        s.stride(0),
        ro.stride(0),
        n,
        width,
        groups,
        eps,
        HAS_RESIDUAL=residual is not None,
        NORM_DTYPE=_TL_DTYPES[torch.promote_types(x.dtype, weight.dtype)],
        NG=ng,
        G=g,
        num_warps=min(max(ng * g // 256, 1), 16),
        **launch_options(x.device),
    )
    return q, s, res_out


def silu_and_mul_quant(
    gate: torch.Tensor, up: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    m, n = gate.shape
    width, groups, ng, g = _layout(n, group_size)
    q = torch.empty((m, n), dtype=FP8_DTYPE, device=gate.device)
    s = torch.empty((m, groups), dtype=torch.float32, device=gate.device)
    if m == 0:
        return q, s
    gate, up = _rows(gate), _rows(up)
    _silu_and_mul_quant_kernel[(m,)](
        gate,
        up,
        q,
        s,
        gate.stride(0),
        up.stride(0),
        q.stride(0),
        s.stride(0),
        n,
        width,
        groups,
        OUT_DTYPE=_TL_DTYPES[torch.promote_types(gate.dtype, up.dtype)],
        NG=ng,
        G=g,
        num_warps=min(max(ng * g // 256, 1), 16),
        **launch_options(gate.device),
    )
    return q, s
