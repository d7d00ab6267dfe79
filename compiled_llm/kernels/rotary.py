"""`compiled_llm::rotary_embedding` and `compiled_llm::rms_norm_rope` (NeoX half-split RoPE).

`rotary_embedding(x, cos, sin)` is layers/rotary.apply_rotary for x [T, heads, head_dim] and
cos/sin [T, head_dim / 2]. `rms_norm_rope(x, weight, cos, sin, eps)` first normalizes each head
of x with RMSNorm (weight [head_dim]), as Qwen3 does to q and k, then rotates it: one pass over
x instead of a reduction kernel and a pointwise kernel.
"""

from __future__ import annotations

import torch

from compiled_llm.layers.norm import rms_norm
from compiled_llm.layers.rotary import apply_rotary

_LIB = torch.library.Library("compiled_llm", "FRAGMENT")
_LIB.define("rotary_embedding(Tensor x, Tensor cos, Tensor sin) -> Tensor")
_LIB.define("rms_norm_rope(Tensor x, Tensor weight, Tensor cos, Tensor sin, float eps) -> Tensor")


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if x.dim() != 3 or x.shape[-1] % 2:
        raise ValueError(f"x must be [tokens, heads, even head_dim], got {tuple(x.shape)}")
    half = (x.shape[0], x.shape[-1] // 2)
    if cos.shape != half or sin.shape != half:
        raise ValueError(
            f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must be [tokens, head_dim/2] "
            f"= {half}"
        )


@torch.library.register_fake("compiled_llm::rotary_embedding", lib=_LIB)
def _rotary_embedding_fake(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape)


@torch.library.register_fake("compiled_llm::rms_norm_rope", lib=_LIB)
def _rms_norm_rope_fake(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


def _rotary_embedding_cpu(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    _check(x, cos, sin)
    return apply_rotary(x, cos, sin).contiguous()


def _rms_norm_rope_cpu(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
) -> torch.Tensor:
    _check(x, cos, sin)
    return apply_rotary(rms_norm(x, weight, eps), cos, sin).contiguous()


def _rotary_embedding_cuda(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    from compiled_llm.kernels.triton_rotary import rotary

    _check(x, cos, sin)
    return rotary(x, cos, sin)


def _rms_norm_rope_cuda(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
) -> torch.Tensor:
    from compiled_llm.kernels.triton_rotary import rotary

    _check(x, cos, sin)
    return rotary(x, cos, sin, weight, eps)


_LIB.impl("rotary_embedding", _rotary_embedding_cpu, "CPU")
_LIB.impl("rotary_embedding", _rotary_embedding_cuda, "CUDA")
_LIB.impl("rms_norm_rope", _rms_norm_rope_cpu, "CPU")
_LIB.impl("rms_norm_rope", _rms_norm_rope_cuda, "CUDA")
