"""`silu(gate) * up` -> `compiled_llm::silu_and_mul(gate, up)`.

`gate` and `up` are wildcards, so the one pattern covers both the plain MLP (two GEMM outputs)
and the merged one after gemm_merge (`gate, up = y.split([I, I], -1)`): the op reads both halves
of the merged output in place.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

import compiled_llm.kernels  # noqa: F401  (registers the ops)
from compiled_llm.passes.base import PatternPass


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.ops.compiled_llm.silu_and_mul.default(gate, up)


class SiluAndMulPass(PatternPass):
    name = "silu_and_mul"
    description = "SwiGLU activation silu(gate) * up (also on merged gate/up) -> silu_and_mul"
    enabled_by_default = False

    def patterns(self) -> list[tuple[Any, ...]]:
        return [(_silu_mul, _silu_and_mul, [self.example(4, 16), self.example(4, 16)])]
