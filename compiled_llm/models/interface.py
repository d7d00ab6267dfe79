"""What the engine asks of a model: the one interface native models and the transformers
fallback (transformers_fallback.py) implement. Everything else is done *to* the model by the compiler and
the runner (passes, quantization, sharding), so the interface stays small."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


class CausalLM(nn.Module, ABC):
    """A plain module over the flat packed batch. Attention goes through the generic op
    (attention_backends/ops.py), which finds the KV cache in the forward context."""

    @abstractmethod
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states [T, hidden] of token ids and positions ([T] each)."""

    @abstractmethod
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [N, vocab] of the rows of `hidden` that sample."""

    @abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Checkpoint tensors (HF names) into the parameters: taken as they are where dtype and
        device match (a memory-mapped file is not copied), else copied; ValueError naming the
        tensor for one that does not fit, and for parameters the checkpoint lacks."""


def head_dim(hf_config: Any) -> int:
    """HF's convention: the config's `head_dim` where it has one, else hidden / heads."""
    declared = getattr(hf_config, "head_dim", None)
    if declared:
        return int(declared)
    return int(hf_config.hidden_size) // int(hf_config.num_attention_heads)
