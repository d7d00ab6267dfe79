"""`silu(gate) * up` followed by the FP8 quantization of its output ->
`compiled_llm::silu_and_mul_quant_fp8(gate, up, group)`: the MLP's activation is written once,
in E4M3, for down_proj. `gate` and `up` are wildcards, so the merged gate/up GEMM's two halves
(after gemm_merge) match as well as two GEMM outputs. Per-token and per-128-column-group
quantization are matched (see fuse_norm_quant.py).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

import compiled_llm.kernels  # noqa: F401  (registers the ops)
from compiled_llm.passes.base import PatternPass
from compiled_llm.passes.fuse_norm_quant import GROUP, _quant

ops = torch.ops.compiled_llm


def patterns_for(group: int) -> tuple[Any, Any]:
    def act(gate: torch.Tensor, up: torch.Tensor) -> Any:
        q, s = _quant(F.silu(gate) * up, group)
        return q, s

    def act_fused(gate: torch.Tensor, up: torch.Tensor) -> Any:
        q, s = ops.silu_and_mul_quant_fp8.default(gate, up, group)
        return q, s

    return act, act_fused


class FuseActQuantPass(PatternPass):
    name = "fuse_act_quant"
    description = "silu(gate) * up + FP8 quantization -> silu_and_mul_quant_fp8 writing E4M3"
    enabled_by_default = False
    default_for_quantization: ClassVar[tuple[str, ...]] = ("fp8",)

    def patterns(self) -> list[tuple[Any, ...]]:
        gate, up = self.example(4, GROUP * 2), self.example(4, GROUP * 2)
        return [(*patterns_for(group), [gate, up]) for group in (0, GROUP)]
