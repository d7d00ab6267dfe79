"""`compiled_llm::rms_norm` and `compiled_llm::fused_add_rms_norm`.

`fused_add_rms_norm(x, residual, weight, eps)` returns `(rms_norm(x + residual), x + residual)`:
the decoder's residual add and the next RMSNorm in one pass over the row, with the new residual
stream as the second output. Numerics follow layers/norm.py: the sum is rounded to the input
dtype, the norm runs in float32, and the normalized row is rounded before the weight multiply.
"""

from __future__ import annotations

import torch

from compiled_llm.layers.norm import rms_norm as _rms_norm_reference

_LIB = torch.library.Library("compiled_llm", "FRAGMENT")
_LIB.define("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor")
_LIB.define(
    "fused_add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)"
)


def _out_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, weight.dtype)


@torch.library.register_fake("compiled_llm::rms_norm", lib=_LIB)
def _rms_norm_fake(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=_out_dtype(x, weight))


@torch.library.register_fake("compiled_llm::fused_add_rms_norm", lib=_LIB)
def _fused_add_rms_norm_fake(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape, dtype=_out_dtype(x, weight)), x.new_empty(x.shape)


def _rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _rms_norm_reference(x, weight, eps).contiguous()


def _fused_add_rms_norm_cpu(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    h = (x + residual).contiguous()
    return _rms_norm_reference(h, weight, eps).contiguous(), h


def _rms_norm_cuda(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from compiled_llm.kernels.triton_norm import rms_norm

    return rms_norm(x, weight, eps)[0]


def _fused_add_rms_norm_cuda(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    from compiled_llm.kernels.triton_norm import rms_norm

    out, h = rms_norm(x, weight, eps, residual)
    assert h is not None
    return out, h


_LIB.impl("rms_norm", _rms_norm_cpu, "CPU")
_LIB.impl("rms_norm", _rms_norm_cuda, "CUDA")
_LIB.impl("fused_add_rms_norm", _fused_add_rms_norm_cpu, "CPU")
_LIB.impl("fused_add_rms_norm", _fused_add_rms_norm_cuda, "CUDA")
