"""Qwen3's per-head RMSNorm of q and k followed by RoPE -> `compiled_llm::rms_norm_rope`.

Runs before `rope` and `fuse_add_rmsnorm`, which would otherwise split the chain between them.
"""

from __future__ import annotations

from typing import Any

import torch

import compiled_llm.kernels  # noqa: F401  (registers the ops)
from compiled_llm.layers.norm import rms_norm
from compiled_llm.layers.rotary import apply_rotary
from compiled_llm.passes.base import PatternPass


def _norm_rope(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
) -> torch.Tensor:
    return apply_rotary(rms_norm(x, weight, eps), cos, sin)


def _norm_rope_op(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
) -> torch.Tensor:
    return torch.ops.compiled_llm.rms_norm_rope.default(x, weight, cos, sin, eps)


class QKNormRopePass(PatternPass):
    name = "qk_norm_rope"
    description = "per-head RMSNorm of q/k + RoPE (Qwen3) -> rms_norm_rope"
    enabled_by_default = False

    def patterns(self) -> list[tuple[Any, ...]]:
        x, w = self.example(4, 2, 16), self.example(16)
        cos = self.example(4, 8, dtype=torch.float32)
        sin = self.example(4, 8, dtype=torch.float32)
        return [(_norm_rope, _norm_rope_op, [x, w, cos, sin], {"eps": 1e-6})]
