"""The hidden states entering selected decoder layers, returned beside the model's output, for
a consumer that reads the target's intermediate states (the EAGLE-3 head,
docs/speculative_decoding.md "EAGLE-3"). Nothing here is in a model file, and a model without a
consumer is not touched.

Every model keeps its decoder layers in `model.model.layers` (HF's layout, which every native
family and its loader follow) and calls each layer with the residual stream as the first
argument. `AuxHiddenStates` registers a forward pre-hook on the selected layers that records that
argument, and its `forward` runs the model's and returns `(hidden, torch.cat(recorded))`. Under
torch.compile the hooks are traced into the graph like the layers themselves: the recorded
tensors become graph outputs and the list they pass through is empty again when the forward
returns, so the graph has no side effect (and a warm start, which runs the saved graph without
Dynamo, needs none). Hooks see the layer's input, not a value inside it, so no pass or fusion is
affected beyond keeping those tensors alive.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no decoder layers at model.model.layers")
    return layers


class AuxHiddenStates(nn.Module):
    """Callable like `model.forward(input_ids, positions)`; returns `(hidden [T, H],
    aux [T, len(layer_ids) * H])`, aux holding the input of layer `layer_ids[j]` in its j-th
    H columns (vLLM's indexing: id i is the output of layer i - 1, 0 the embedding)."""

    def __init__(self, model: nn.Module, layer_ids: tuple[int, ...]) -> None:
        super().__init__()
        self.model = model
        self.layer_ids = layer_ids
        self._recorded: list[tuple[int, torch.Tensor]] = []
        layers = decoder_layers(model)
        for i in sorted(set(layer_ids)):
            layers[i].register_forward_pre_hook(self._recorder(i))

    def _recorder(self, index: int) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            self._recorded.append((index, args[0]))

        return record

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._recorded.clear()
        hidden = self.model.forward(input_ids, positions)
        inputs = dict(self._recorded)
        self._recorded.clear()
        return hidden, torch.cat([inputs[i] for i in self.layer_ids], dim=-1)
