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


def attention_scale(hf_config: Any) -> float:
    """HF's softmax scale: query_pre_attn_scalar ** -0.5 where the config has one (Gemma 2),
    else head_dim ** -0.5."""
    scalar = getattr(hf_config, "query_pre_attn_scalar", None)
    return float(scalar if scalar else head_dim(hf_config)) ** -0.5


def sliding_window(hf_config: Any, layer_idx: int) -> int | None:
    """The layer's sliding window by HF's rule: a config with `layer_types` (Qwen2, Gemma 2)
    windows its "sliding_attention" layers, one without them (Mistral) every layer, where it sets
    `sliding_window` at all (Qwen2 clears it unless use_sliding_window)."""
    window = getattr(hf_config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is not None and layer_types[layer_idx] != "sliding_attention":
        return None
    return int(window)


def load_parameters(
    params: dict[str, nn.Parameter], weights: Iterable[tuple[str, torch.Tensor]], owner: str
) -> None:
    """Each checkpoint tensor into the parameter of its name (shape checked; taken as it is,
    with no copy, when dtype and device match: e.g. a memory-mapped checkpoint's pages); a
    tensor without a parameter or a parameter without a tensor is a ValueError. `owner` names
    the model in the messages."""
    loaded: set[str] = set()
    for name, tensor in weights:
        if name not in params:
            raise ValueError(f"checkpoint tensor {name!r} has no parameter in {owner}")
        param = params[name]
        if tuple(param.shape) != tuple(tensor.shape):
            raise ValueError(
                f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(param.shape)}"
            )
        with torch.no_grad():
            if tensor.dtype == param.dtype and tensor.device == param.device:
                param.data = tensor
            else:
                param.copy_(tensor)
        loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} parameter(s), e.g. {missing[:3]}")
