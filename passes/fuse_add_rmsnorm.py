"""Residual add + RMSNorm -> `compiled_llm::fused_add_rms_norm`; a lone RMSNorm -> `rms_norm`.

The patterns are the model's own `layers.norm.rms_norm`, traced for the pass's dtype (in float32
its casts vanish, in bf16/fp16 they are part of the pattern). Three forms of the add are matched:
`residual + x` and `x + residual` as written, and, on CPU, `addmm(residual, a, b)`, which is what
Inductor makes of a residual add that follows a GEMM (o_proj, down_proj) before our pass runs.
"""

from __future__ import annotations

from typing import Any

import torch

import compiled_llm.kernels  # noqa: F401  (registers the ops)
from compiled_llm.layers.norm import rms_norm
from compiled_llm.passes.base import PatternPass

EPS = {"eps": 1e-6}  # matched as a wildcard; the graph's own value reaches the replacement


def _fused(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> Any:
    out, h = torch.ops.compiled_llm.fused_add_rms_norm.default(x, residual, weight, eps)
    return out, h


def _add_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> Any:
    h = residual + x
    return rms_norm(h, weight, eps), h


def _add_norm_swapped(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> Any:
    h = x + residual
    return rms_norm(h, weight, eps), h


def _addmm_norm(
    residual: torch.Tensor, a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, eps: float
) -> Any:
    h = torch.addmm(residual, a, b)
    return rms_norm(h, weight, eps), h


def _addmm_norm_replacement(
    residual: torch.Tensor, a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, eps: float
) -> Any:
    return _fused(torch.mm(a, b), residual, weight, eps)


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm(x, weight, eps)


def _norm_replacement(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.ops.compiled_llm.rms_norm.default(x, weight, eps)


class FuseAddRMSNormPass(PatternPass):
    name = "fuse_add_rmsnorm"
    description = "residual add + RMSNorm -> fused_add_rms_norm (and a lone RMSNorm -> rms_norm)"
    enabled_by_default = False

    def patterns(self) -> list[tuple[Any, ...]]:
        x, r, w, b = (
            self.example(4, 16),
            self.example(4, 16),
            self.example(16),
            self.example(16, 16),
        )
        # Fused forms first: a lone-norm match would otherwise take the norm and strand the add.
        return [
            (_add_norm, _fused, [x, r, w], EPS),
            (_add_norm_swapped, _fused, [x, r, w], EPS),
            (_addmm_norm, _addmm_norm_replacement, [r, x, b, w], EPS),
            (_norm, _norm_replacement, [x, w], EPS),
        ]
