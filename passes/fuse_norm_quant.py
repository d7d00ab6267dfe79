"""RMSNorm (after a residual add, or alone) followed by the FP8 quantization of its output ->
`compiled_llm::fused_add_rms_norm_quant_fp8` / `rms_norm_quant_fp8`: the normalized row is
quantized where it is computed and reaches memory once, in E4M3, instead of in the model's dtype
and read back by the quantizer.

In an FP8 model (quantization/fp8.py) every decoder layer has three such sites: the input norm
feeding q/k/v, the post-attention norm feeding gate/up (each one quantization after gemm_merge,
which the pass needs: with three separate quantizations of one norm the norm's output has other
users and stays), and the next layer's input norm after the residual add. The final norm feeds
the full-precision head and stays a plain norm. Activations quantized per token and per group
of 128 columns (block-quantized weights) are matched; other group widths are left alone.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

import compiled_llm.kernels  # noqa: F401  (registers the ops)
from compiled_llm.layers.norm import rms_norm
from compiled_llm.passes.base import PatternPass

EPS = {"eps": 1e-6}  # matched as a wildcard; the graph's own value reaches the replacement
GROUP = 128  # the block width of the FP8 checkpoints in use (DeepSeek-style 128 x 128)
ops = torch.ops.compiled_llm


def _quant(y: torch.Tensor, group: int) -> Any:
    if group == 0:
        return ops.quant_fp8_per_token.default(y)
    return ops.quant_fp8_per_group.default(y, group)


def patterns_for(group: int) -> list[tuple[Any, Any, bool]]:
    """(search, replacement, takes a residual) for one quantization granularity."""

    def norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> Any:
        q, s = _quant(rms_norm(x, weight, eps), group)
        return q, s

    def norm_fused(x: torch.Tensor, weight: torch.Tensor, eps: float) -> Any:
        q, s = ops.rms_norm_quant_fp8.default(x, weight, eps, group)
        return q, s

    def add_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> Any:
        h = residual + x
        q, s = _quant(rms_norm(h, weight, eps), group)
        return q, s, h

    def add_norm_swapped(
        x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> Any:
        h = x + residual
        q, s = _quant(rms_norm(h, weight, eps), group)
        return q, s, h

    def add_norm_fused(
        x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> Any:
        q, s, h = ops.fused_add_rms_norm_quant_fp8.default(x, residual, weight, eps, group)
        return q, s, h

    # Fused forms first: a lone-norm match would otherwise take the norm and strand the add.
    return [
        (add_norm, add_norm_fused, True),
        (add_norm_swapped, add_norm_fused, True),
        (norm, norm_fused, False),
    ]


class FuseNormQuantPass(PatternPass):
    name = "fuse_norm_quant"
    description = "(residual add +) RMSNorm + FP8 quantization -> one op writing E4M3"
    enabled_by_default = False
    default_for_quantization: ClassVar[tuple[str, ...]] = ("fp8",)

    def patterns(self) -> list[tuple[Any, ...]]:
        x, r, w = self.example(4, GROUP * 2), self.example(4, GROUP * 2), self.example(GROUP * 2)
        return [
            (search, replace, [x, r, w] if residual else [x, w], EPS)
            for group in (0, GROUP)
            for search, replace, residual in patterns_for(group)
        ]
