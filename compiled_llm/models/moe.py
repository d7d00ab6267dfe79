"""A sparse mixture-of-experts block, and loading per-expert checkpoint tensors into its stacked
weights.

`SparseMoeBlock` is plain PyTorch around one opaque op: the router is an `nn.Linear`, the top-k
routing plain tensor ops (layers/moe.select_experts, which Inductor fuses), and the experts one
`compiled_llm::fused_experts` call on stacked weights. Parameter names follow transformers 5
(`mlp.gate.weight`, `mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]),
so a checkpoint saved in that stacked layout loads as it is. Checkpoints on the Hub (and what
transformers' `save_pretrained` writes) hold one tensor per expert and projection instead;
`ExpertLayout` maps those names into slices of the stacked parameters at load.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from compiled_llm.kernels.moe import fused_experts
from compiled_llm.layers.moe import select_experts


def check_activation(cfg: Any, family: str) -> None:
    """The experts' SwiGLU is SiLU-gated; another hidden_act is refused, not silently changed."""
    act = getattr(cfg, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{family} with hidden_act={act!r} is not supported (only silu)")


class StackedExperts(nn.Module):
    """Every expert's SwiGLU weights in two tensors: gate rows then up rows per expert
    ([E, 2I, H], merged at load like the dense GEMM merge), and the down projection."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size)
        )
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        return fused_experts(x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids)


class SparseMoeBlock(nn.Module):
    # Quantization leaves the router in full precision (quantization/base.eligible_linears).
    full_precision_children: ClassVar[tuple[str, ...]] = ("gate",)

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        renormalize: bool,
    ) -> None:
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok={top_k} must be in 1..num_experts={num_experts}")
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = StackedExperts(num_experts, hidden_size, intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(self.gate(x), self.top_k, self.renormalize)
        return self.experts(x, weights, ids)

    def extra_repr(self) -> str:
        return f"top_k={self.top_k}, renormalize={self.renormalize}"


@dataclass(frozen=True)
class ExpertLayout:
    """A checkpoint's per-expert tensor names: `pattern` matches one and captures the layer's
    module prefix (`prefix`), the expert index (`expert`) and the projection (`proj`);
    `gate`/`up`/`down` name the projections (Qwen3-MoE: gate_proj/up_proj/down_proj; Mixtral:
    w1/w3/w2). `renames` rewrite other checkpoint names to ours (Mixtral's block_sparse_moe)."""

    pattern: str
    gate: str
    up: str
    down: str
    renames: tuple[tuple[str, str], ...] = ()

    def rename(self, name: str) -> str:
        for old, new in self.renames:
            name = name.replace(old, new)
        return name

    def stacked(
        self, params: dict[str, nn.Parameter], weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """`weights` with each per-expert tensor copied into its slice of the stacked parameter
        (`<prefix>.experts.gate_up_proj` / `down_proj`) instead of passed on; each stacked
        parameter is passed on once every expert has filled it, so `load_parameters` counts it
        as loaded. ValueError for a tensor of an unknown parameter or expert, a wrong shape, or
        a stacked parameter some expert tensors are missing from."""
        regex = re.compile(self.pattern)
        parts = {self.gate: ("gate_up_proj", 0), self.up: ("gate_up_proj", 1)}
        parts[self.down] = ("down_proj", 0)
        filled: dict[str, set[tuple[int, int]]] = {}
        for name, tensor in weights:
            match = regex.fullmatch(name)
            if match is None:
                yield self.rename(name), tensor
                continue
            prefix = self.rename(match["prefix"])
            target, half = parts[match["proj"]]
            stacked_name = f"{prefix}.experts.{target}"
            param = params.get(stacked_name)
            if param is None:
                raise ValueError(f"checkpoint tensor {name!r} has no stacked parameter")
            expert = int(match["expert"])
            if expert >= param.shape[0]:
                raise ValueError(
                    f"checkpoint tensor {name!r}: expert {expert} of {param.shape[0]} experts"
                )
            rows = param.shape[1] // 2 if target == "gate_up_proj" else param.shape[1]
            part = param.data[expert, half * rows : (half + 1) * rows]
            if tuple(tensor.shape) != tuple(part.shape):
                raise ValueError(
                    f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(part.shape)}"
                )
            with torch.no_grad():
                part.copy_(tensor)
            done = filled.setdefault(stacked_name, set())
            done.add((expert, half))
            if len(done) == param.shape[0] * (2 if target == "gate_up_proj" else 1):
                yield stacked_name, param.data
        for stacked_name, done in filled.items():
            param = params[stacked_name]
            halves = 2 if stacked_name.endswith("gate_up_proj") else 1
            if len(done) < param.shape[0] * halves:
                missing = sorted(
                    {(e, h) for e in range(param.shape[0]) for h in range(halves)} - done
                )
                raise ValueError(
                    f"checkpoint lacks {len(missing)} expert tensor(s) of {stacked_name!r} "
                    f"(expert, half): {missing[:3]}"
                )
