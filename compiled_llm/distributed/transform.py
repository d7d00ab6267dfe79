"""Shard a plain model for one rank: swap modules on the meta-device model before its weights
load, so each rank allocates only its shards and the loader reads only its slices.

Column-parallel linears become narrower `nn.Linear`s; row-parallel ones `RowParallelLinear`,
whose output is all-reduced; stacked MoE experts get narrower parameters and an all-reduce of
their output. The model's code is not touched: its attention infers the head count from the
projections' widths.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compiled_llm.distributed.parallel import TensorParallel
from compiled_llm.distributed.plan import ShardPlan


class RowParallelLinear(nn.Linear):
    """A linear over this rank's input columns: the partial products are summed over the group
    (a functional all-reduce, visible in the captured graph), then the bias is added once."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        tp: TensorParallel,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.tp.rank}/{self.tp.world_size}"


def output_reduced_over(linear: nn.Module) -> TensorParallel | None:
    """The group whose ranks' partial outputs `linear`'s output is the sum of (a row-parallel
    layer's); None for a layer whose output is whole on this rank. A transform that replaces the
    layer (quantization) keeps that sum."""
    return linear.tp if isinstance(linear, RowParallelLinear) else None


def _all_reduce_hook(tp: TensorParallel) -> Any:
    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return tp.all_reduce(output)

    return hook


def _sharded_linear(name: str, linear: nn.Linear, plan: ShardPlan) -> nn.Linear | None:
    spec = plan.spec(f"{name}.weight")
    if spec is None:
        return None
    out_features, in_features = spec.shape(linear.weight.shape)
    device, dtype = linear.weight.device, linear.weight.dtype
    bias = linear.bias is not None
    if plan.reduces_output(name):
        return RowParallelLinear(in_features, out_features, bias, plan.tp, device, dtype)
    return nn.Linear(in_features, out_features, bias, device=device, dtype=dtype)


@torch.no_grad()
def shard_model(model: nn.Module, plan: ShardPlan) -> nn.Module:
    """Replace the modules `plan` shards, in place (on the meta device: nothing is allocated).
    ValueError for a parameter the plan shards inside a module this transform cannot
    rewrite, rather than a silently wrong model."""
    if plan.tp.world_size == 1:
        return model
    done: set[str] = set()
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and type(module) is nn.Linear:
            new = _sharded_linear(name, module, plan)
            if new is None:
                continue
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
            done.update(f"{name}.{p}" for p, _ in new.named_parameters())
            continue
        sharded = False
        for pname, param in list(module.named_parameters(recurse=False)):
            spec = plan.spec(f"{name}.{pname}")
            if spec is None or param.dim() < 3:
                continue  # only stacked (expert) weights are sharded as bare parameters
            shape = spec.shape(param.shape)
            local = torch.empty(shape, device=param.device, dtype=param.dtype)
            setattr(module, pname, nn.Parameter(local, requires_grad=param.requires_grad))
            done.add(f"{name}.{pname}")
            sharded = True
        if sharded and plan.reduces_output(name):
            module.register_forward_hook(_all_reduce_hook(plan.tp))
    left = [n for n, _ in model.named_parameters() if plan.spec(n) and n not in done]
    if left:
        raise ValueError(
            f"tensor parallelism cannot shard {len(left)} parameter(s) of "
            f"{type(model).__name__}, e.g. {left[:3]} (no rule for their module)"
        )
    return model
