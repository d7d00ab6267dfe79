"""Rotary embedding (layers/rotary.apply_rotary, NeoX half split) -> `rotary_embedding`.

Traced for the pass's dtype: in bf16/fp16 the pattern includes the cast of the float32 cos/sin
to x's dtype. Each of q and k is one match.
"""

from __future__ import annotations

from typing import Any

import torch

import compiled_llm.kernels  # noqa: F401  (registers the ops)
from compiled_llm.layers.rotary import apply_rotary
from compiled_llm.passes.base import PatternPass


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return apply_rotary(x, cos, sin)


def _rotary_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return torch.ops.compiled_llm.rotary_embedding.default(x, cos, sin)


class RopePass(PatternPass):
    name = "rope"
    description = "rotary embedding of q and of k (NeoX half split) -> rotary_embedding"
    enabled_by_default = False

    def patterns(self) -> list[tuple[Any, ...]]:
        cos = self.example(4, 8, dtype=torch.float32)
        sin = self.example(4, 8, dtype=torch.float32)
        return [(_rotary, _rotary_op, [self.example(4, 2, 16), cos, sin])]
