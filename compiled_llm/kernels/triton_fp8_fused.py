"""Triton RMSNorm (+ residual add) and SiLU-and-mul, each ending in the FP8 quantization of its
output: one program per row holds the row in registers as [groups, group] tiles, so the output
is rounded as the model rounds it, reduced to one amax per group and written once, in E4M3.

At a few tokens one program per row leaves the GPU nearly empty (a 14,336-wide SiLU-and-mul row
took 6 us on one H200 SM, issuing its arithmetic alone). SiLU-and-mul therefore splits rows into
chunks of columns where the batch is small: with per-group scales each chunk holds whole groups
(one kernel); with one scale per token a first kernel writes each chunk's amax, and the second
takes the row's amax from those, recomputes its chunk and quantizes it: the same roundings, so
the same codes and scales as one program per row.

Roundings follow the unfused ops: the residual sum in the input dtype, the normalized row in the
input dtype before the weight multiply, the norm's (or silu * up's) output in its own dtype
before its amax; quantization as in kernels/fp8.py.
"""

from __future__ import annotations

import functools

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
def _silu_and_mul(gate_ptr, up_ptr, cols, mask, OUT_DTYPE: tl.constexpr):
    """silu(gate) * up at `cols` of a row, rounded as the unfused ops round it, in float32."""
    gate = tl.load(gate_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    s = (gate * tl.sigmoid(gate)).to(gate_ptr.dtype.element_ty).to(tl.float32)
    return (s * up).to(OUT_DTYPE).to(tl.float32)


@triton.jit
def _silu_and_mul_amax_kernel(
    gate_ptr,
    up_ptr,
    amax_ptr,
    stride_gate,
    stride_up,
    n_cols,
    OUT_DTYPE: tl.constexpr,
    CHUNK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """amax [row, chunk] of silu(gate) * up over the chunk's CHUNK columns."""
    wait_for_previous(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    gate_row, up_row = gate_ptr + row * stride_gate, up_ptr + row * stride_up
    out = _silu_and_mul(gate_row, up_row, cols, cols < n_cols, OUT_DTYPE)
    tl.store(amax_ptr + row * tl.num_programs(1) + chunk, tl.max(tl.abs(out), axis=0))


@triton.jit
def _silu_and_mul_quant_kernel(
    gate_ptr,
    up_ptr,
    q_ptr,
    s_ptr,
    amax_ptr,  # per token over chunks: amax [row, chunk] (_silu_and_mul_amax_kernel)
    stride_gate,
    stride_up,
    stride_q,
    stride_s,
    n_cols,
    group_size,
    n_groups,
    OUT_DTYPE: tl.constexpr,  # silu(gate) * up's dtype
    NG: tl.constexpr,  # groups a program quantizes
    G: tl.constexpr,
    CHUNKS_PAD: tl.constexpr,  # per token over chunks: the chunk count, padded; else 0
    USE_PDL: tl.constexpr,
):
    """Program (row, chunk) quantizes groups [chunk * NG, (chunk + 1) * NG) of its row; per
    token over chunks, columns [chunk * G, (chunk + 1) * G) with the row's one scale."""
    wait_for_previous(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    c = tl.arange(0, G)[None, :]
    if CHUNKS_PAD:
        cols = chunk * G + c
        mask = cols < n_cols
    else:
        g = chunk * NG + tl.arange(0, NG)[:, None]
        cols = g * group_size + c
        mask = (c < group_size) & (cols < n_cols) & (g < n_groups)
    gate_row, up_row = gate_ptr + row * stride_gate, up_ptr + row * stride_up
    out = _silu_and_mul(gate_row, up_row, cols, mask, OUT_DTYPE)
    q_row, s_row = q_ptr + row * stride_q, s_ptr + row * stride_s
    if CHUNKS_PAD:
        parts = tl.arange(0, CHUNKS_PAD)
        num_chunks = tl.num_programs(1)
        amax = tl.load(amax_ptr + row * num_chunks + parts, mask=parts < num_chunks, other=0.0)
        # div_rn: Triton's `/` on float32 is approximate, the reference's division is not.
        scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), _FP8_MAX), _MIN_SCALE)
        if chunk == 0:
            tl.store(s_row, scale)
        q = tl.clamp(tl.math.div_rn(out, scale), -_FP8_MAX, _FP8_MAX)
        tl.store(q_row + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    else:
        _quantize_tile(out, q_row, s_row + chunk * NG, cols, mask, n_groups - chunk * NG, NG)


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


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter's CPU tensors: few, so that tests see rows split
    return torch.cuda.get_device_properties(device).multi_processor_count


MIN_CHUNK = 512  # columns a program takes at least where rows are split


def _chunks(m: int, n: int, device: torch.device) -> int:
    """Chunks per row: enough programs for the GPU, each at least MIN_CHUNK columns."""
    return max(1, min(_num_sms(device) // m, triton.cdiv(n, MIN_CHUNK)))


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
    out_dtype = _TL_DTYPES[torch.promote_types(gate.dtype, up.dtype)]
    pdl = launch_options(gate.device)
    chunks = _chunks(m, n, gate.device)
    amax, chunks_pad = s, 0  # amax: unused unless one scale per token over chunks
    if group_size == 0 and chunks > 1:
        g = triton.next_power_of_2(triton.cdiv(n, chunks))
        chunks = triton.cdiv(n, g)
        chunks_pad = triton.next_power_of_2(chunks)
        amax = torch.empty((m, chunks), dtype=torch.float32, device=gate.device)
        _silu_and_mul_amax_kernel[(m, chunks)](
            gate,
            up,
            amax,
            gate.stride(0),
            up.stride(0),
            n,
            OUT_DTYPE=out_dtype,
            CHUNK=g,
            num_warps=min(max(g // 256, 1), 16),
            **pdl,
        )
    elif group_size == 0:
        chunks = 1
    else:  # whole groups per chunk
        ng = triton.next_power_of_2(triton.cdiv(groups, chunks))
        chunks = triton.cdiv(groups, ng)
    _silu_and_mul_quant_kernel[(m, chunks)](
        gate,
        up,
        q,
        s,
        amax,
        gate.stride(0),
        up.stride(0),
        q.stride(0),
        s.stride(0),
        n,
        width,
        groups,
        OUT_DTYPE=out_dtype,
        NG=1 if chunks_pad else ng,
        G=g,
        CHUNKS_PAD=chunks_pad,
        num_warps=min(max((1 if chunks_pad else ng) * g // 256, 1), 16),
        **pdl,
    )
    return q, s
