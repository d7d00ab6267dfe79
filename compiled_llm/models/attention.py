"""A model's attention layer: the generic paged-attention op with the layer's static attributes.

Models build one `Attention` per layer with plain constructor arguments (window, soft-cap) and
call it on q, k, v; the engine reads every layer's attributes from these modules when it builds
the attention backend (`layer_attention`), so a backend lacking a feature refuses the model at
load, and the same values reach the op.
"""

from __future__ import annotations

import torch
from torch import nn

from compiled_llm.attention_backends.base import LayerAttention
from compiled_llm.attention_backends.ops import attention


class Attention(nn.Module):
    def __init__(
        self,
        layer_idx: int,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        attrs = LayerAttention(sliding_window, logits_soft_cap)
        # None for plain causal layers: their op call (and graph) is what it was before
        # layers had attributes.
        self.attrs = attrs if attrs.features() else None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] (position-encoded) -> [T, Hq, D]."""
        return attention(q, k, v, self.layer_idx, self.attrs)

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, {self.attrs}"


def layer_attention(model: nn.Module, num_layers: int) -> tuple[LayerAttention, ...]:
    """Each layer's attributes by layer index; layers without an `Attention` module (a model
    that calls the op itself) are plain causal."""
    layers = [LayerAttention()] * num_layers
    for module in model.modules():
        if isinstance(module, Attention):
            layers[module.layer_idx] = module.attrs or LayerAttention()
    return tuple(layers)
