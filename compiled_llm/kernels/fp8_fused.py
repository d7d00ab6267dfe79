"""Ops that produce an FP8 linear's quantized input directly, so the tensor between a norm or
the MLP activation and the next GEMM is written once, in E4M3 (passes/fuse_norm_quant.py,
passes/fuse_act_quant.py put them in the graph):

- `rms_norm_quant_fp8(x, weight, eps, group_size) -> (q, scale)`
- `fused_add_rms_norm_quant_fp8(x, residual, weight, eps, group_size) -> (q, scale, x + residual)`
- `silu_and_mul_quant_fp8(gate, up, group_size) -> (q, scale)`

`group_size` 0 quantizes per token (scale [M, 1]), else per group of that many columns (scale
[M, ceil(K / group_size)]). CPU: the model's layer code then the quantizer of kernels/fp8.py, so
they equal the unfused ops exactly. CUDA: one Triton program per row (triton_fp8_fused.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compiled_llm.kernels.fp8 import FP8_DTYPE, quantize_per_group, quantize_per_token
from compiled_llm.layers.norm import rms_norm

_LIB = torch.library.Library("compiled_llm", "FRAGMENT")
_LIB.define(
    "rms_norm_quant_fp8(Tensor x, Tensor weight, float eps, int group_size) -> (Tensor, Tensor)"
)
_LIB.define(
    "fused_add_rms_norm_quant_fp8(Tensor x, Tensor residual, Tensor weight, float eps, "
    "int group_size) -> (Tensor, Tensor, Tensor)"
)
_LIB.define("silu_and_mul_quant_fp8(Tensor gate, Tensor up, int group_size) -> (Tensor, Tensor)")


def quantize_rows(y: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference quantizer the fused ops end with."""
    return quantize_per_token(y) if group_size == 0 else quantize_per_group(y, group_size)


def _check(x: torch.Tensor, group_size: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"inputs must be [tokens, features], got {tuple(x.shape)}")
    if group_size < 0:
        raise ValueError(f"group_size must be 0 (per token) or positive, got {group_size}")


def _fake_quant(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    groups = 1 if group_size == 0 else -(-x.shape[1] // group_size)
    q = x.new_empty(x.shape, dtype=FP8_DTYPE)
    return q, x.new_empty((x.shape[0], groups), dtype=torch.float32)


@torch.library.register_fake("compiled_llm::rms_norm_quant_fp8", lib=_LIB)
def _norm_fake(x: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int):
    return _fake_quant(x, group_size)


@torch.library.register_fake("compiled_llm::fused_add_rms_norm_quant_fp8", lib=_LIB)
def _add_norm_fake(x, residual, weight, eps: float, group_size: int):  # noqa: ANN001
    return (*_fake_quant(x, group_size), x.new_empty(x.shape))


@torch.library.register_fake("compiled_llm::silu_and_mul_quant_fp8", lib=_LIB)
def _silu_fake(gate: torch.Tensor, up: torch.Tensor, group_size: int):
    return _fake_quant(gate, group_size)


def _norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int):
    _check(x, group_size)
    return quantize_rows(rms_norm(x, weight, eps), group_size)


def fused_add_rms_norm_quant_fp8_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(x, group_size)
    h = (x + residual).contiguous()
    return (*quantize_rows(rms_norm(h, weight, eps), group_size), h)


def _silu_cpu(gate: torch.Tensor, up: torch.Tensor, group_size: int):
    _check(gate, group_size)
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")
    return quantize_rows(F.silu(gate) * up, group_size)


def _norm_cuda(x: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int):
    from compiled_llm.kernels.triton_fp8_fused import rms_norm_quant

    _check(x, group_size)
    q, s, _ = rms_norm_quant(x, weight, eps, group_size)
    return q, s


def _add_norm_cuda(x, residual, weight, eps: float, group_size: int):  # noqa: ANN001
    from compiled_llm.kernels.triton_fp8_fused import rms_norm_quant

    _check(x, group_size)
    if residual.shape != x.shape:  # the kernel reads the residual row by row, unbroadcast
        raise ValueError(f"residual {tuple(residual.shape)} and x {tuple(x.shape)} differ in shape")
    q, s, h = rms_norm_quant(x, weight, eps, group_size, residual)
    assert h is not None
    return q, s, h


def _silu_cuda(gate: torch.Tensor, up: torch.Tensor, group_size: int):
    from compiled_llm.kernels.triton_fp8_fused import silu_and_mul_quant

    _check(gate, group_size)
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")
    return silu_and_mul_quant(gate, up, group_size)


_LIB.impl("rms_norm_quant_fp8", _norm_cpu, "CPU")
_LIB.impl("fused_add_rms_norm_quant_fp8", fused_add_rms_norm_quant_fp8_reference, "CPU")
_LIB.impl("silu_and_mul_quant_fp8", _silu_cpu, "CPU")
_LIB.impl("rms_norm_quant_fp8", _norm_cuda, "CUDA")
_LIB.impl("fused_add_rms_norm_quant_fp8", _add_norm_cuda, "CUDA")
_LIB.impl("silu_and_mul_quant_fp8", _silu_cuda, "CUDA")
