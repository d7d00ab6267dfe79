"""What a quantization method does to a plain model: a transform, never code in model files.

The loader (models/loader.py) calls, in order:
- `prepare(model)` on the model still on the meta device, for a pre-quantized checkpoint: swaps
  each eligible `nn.Linear` for the method's quantized layer with parameters shaped as the
  checkpoint stores them (so loading takes the checkpoint's tensors as they are);
- `checkpoint_weights(model, weights)`: the checkpoint's tensors renamed and reshaped to those
  parameters (e.g. `weight_scale_inv` -> `weight_scale`);
- `quantize(model)` after float weights were loaded (`quantization="fp8"` on a float
  checkpoint, or random weights): quantizes each eligible layer in place.

Under tensor parallelism the model was sharded first (distributed/transform.py), so the layers
a method replaces already hold one rank's shard; a row-parallel layer's replacement keeps its
all-reduce (docs/quantization.md, "Tensor parallelism"). Before a pre-quantized checkpoint is
read, `checkpoint_slices` says which slice of each of the method's tensors (scales) the rank
reads with its weight slice.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import ClassVar

import torch
from torch import nn

from compiled_llm.distributed.plan import ShardSpec
from compiled_llm.distributed.transform import RowParallelLinear
from compiled_llm.quantization.config import QuantizationConfig

SliceRule = Callable[[str], ShardSpec | None]  # checkpoint tensor name -> this rank's slice


class QuantizationMethod(ABC):
    name: ClassVar[str]

    def __init__(self, config: QuantizationConfig) -> None:
        self.config = config

    @abstractmethod
    def prepare(self, model: nn.Module) -> int:
        """Swap eligible layers for quantized ones awaiting checkpoint tensors; how many."""

    @abstractmethod
    def checkpoint_weights(
        self, model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's tensors as the prepared parameters take them."""

    @abstractmethod
    def quantize(self, model: nn.Module) -> int:
        """Quantize the eligible layers of a model holding float weights; how many."""

    def checkpoint_slices(self, model: nn.Module, weight_slices: SliceRule) -> SliceRule:
        """Which slice of each checkpoint tensor this rank reads, given the tensor-parallel
        plan's rule (`weight_slices`, which knows weights and biases by name): a method whose
        layers have other tensors (scales) says here how they follow their weight's slice,
        and refuses (ValueError naming the layer) a slice they cannot follow."""
        return weight_slices


# Exactly these layer types, not any subclass of nn.Linear: a subclass may compute something
# else with its weight, which a quantized layer would silently drop.
QUANTIZABLE = (nn.Linear, RowParallelLinear)


def eligible_linears(model: nn.Module, config: QuantizationConfig) -> list[tuple[str, nn.Linear]]:
    """Every plain `nn.Linear` of the model (or tensor-parallel `RowParallelLinear`, whose
    all-reduce the quantized layer keeps) that the config does not leave in full precision
    (the output head never is quantized: see config.ALWAYS_IGNORED) and that no module keeps in
    full precision: a module lists such children in its `full_precision_children` (an MoE
    block's router, as vLLM keeps it: a tiny GEMM whose small logit errors change which experts
    run)."""
    kept = {
        f"{name}.{child}" if name else child
        for name, module in model.named_modules()
        for child in getattr(module, "full_precision_children", ())
    }
    return [
        (name, module)
        for name, module in model.named_modules()
        if type(module) in QUANTIZABLE and name not in kept and not config.ignores(name)
    ]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
