"""What a quantization method does to a plain model: a transform, never code in model files.

The loader (models/loader.py) calls, in order:
- `prepare(model)` on the model still on the meta device, for a pre-quantized checkpoint: swaps
  each eligible `nn.Linear` for the method's quantized layer with parameters shaped as the
  checkpoint stores them (so loading takes the checkpoint's tensors as they are);
- `checkpoint_weights(model, weights)`: the checkpoint's tensors renamed and reshaped to those
  parameters (e.g. `weight_scale_inv` -> `weight_scale`);
- `quantize(model)` after float weights were loaded (`quantization="fp8"` on a float
  checkpoint, or random weights): quantizes each eligible layer in place.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import ClassVar

import torch
from torch import nn

from compiled_llm.quantization.config import QuantizationConfig


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


def eligible_linears(model: nn.Module, config: QuantizationConfig) -> list[tuple[str, nn.Linear]]:
    """Every plain `nn.Linear` of the model that the config does not leave in full precision
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
        if type(module) is nn.Linear and name not in kept and not config.ignores(name)
    ]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
