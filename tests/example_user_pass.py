"""The worked example of docs/passes.md: a fusion written outside compiled-llm.

Enable it with `--passes=+tests.example_user_pass:SwiGLUPass` (or an entry point).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compiled_llm.passes.base import PatternPass


# 1. The fused op: a torch.library op with an implementation and a fake (shape-only) one.
@torch.library.custom_op("example::swiglu", mutates_args=())
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up  # a real kernel would go here


@swiglu.register_fake
def _(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(gate)


# 2. The pattern, written as plain PyTorch, and its replacement.
def search(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def replace(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return swiglu(gate, up)


# 3. The pass: a name, what it fuses, and example inputs to trace the pattern with.
class SwiGLUPass(PatternPass):
    name = "example_swiglu"
    description = "silu(gate) * up -> example::swiglu (the docs/passes.md example)"
    enabled_by_default = False

    def patterns(self):
        return [(search, replace, [self.example(4, 16), self.example(4, 16)])]
