"""Triton SiLU-and-mul over rows whose gate and up halves may live in one merged GEMM output."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(
    gate_ptr,
    up_ptr,
    out_ptr,
    stride_gate,
    stride_up,
    stride_out,
    n_cols,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    # As in eager: silu's result is rounded to the gate's dtype before the multiply.
    s = (g * tl.sigmoid(g)).to(gate_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (s * u).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` into a new contiguous tensor; gate/up need only a unit last stride."""
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")
    n = gate.shape[-1]
    out = torch.empty(
        gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device
    )
    g2, u2 = _rows(gate), _rows(up)
    rows = g2.shape[0]
    if rows == 0 or n == 0:
        return out
    block = min(triton.next_power_of_2(n), 1024)
    _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](
        g2,
        u2,
        out.view(-1, n),
        g2.stride(0),
        u2.stride(0),
        n,
        n,
        BLOCK=block,
        num_warps=4,
    )
    return out
