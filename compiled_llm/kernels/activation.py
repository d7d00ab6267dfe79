"""`compiled_llm::silu_and_mul(gate, up) = silu(gate) * up`, the SwiGLU MLP's activation.

`gate` and `up` may be strided views of one tensor (the columns of a merged gate/up GEMM), so
the op reads them in place instead of needing the two halves copied apart.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_LIB = torch.library.Library("compiled_llm", "FRAGMENT")
_LIB.define("silu_and_mul(Tensor gate, Tensor up) -> Tensor")


def _check(gate: torch.Tensor, up: torch.Tensor) -> torch.dtype:
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")
    return torch.promote_types(gate.dtype, up.dtype)


@torch.library.register_fake("compiled_llm::silu_and_mul", lib=_LIB)
def _silu_and_mul_fake(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return gate.new_empty(gate.shape, dtype=_check(gate, up))


def _silu_and_mul_cpu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    _check(gate, up)
    return (F.silu(gate) * up).contiguous()


def _silu_and_mul_cuda(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    from compiled_llm.kernels.triton_activation import silu_and_mul

    return silu_and_mul(gate, up)


_LIB.impl("silu_and_mul", _silu_and_mul_cpu, "CPU")
_LIB.impl("silu_and_mul", _silu_and_mul_cuda, "CUDA")
