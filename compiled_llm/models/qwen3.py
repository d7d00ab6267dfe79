"""Qwen3: Llama's blocks with RMSNorm over each head of q and k before RoPE."""

from __future__ import annotations

from typing import Any

import torch

from compiled_llm.layers.norm import RMSNorm
from compiled_llm.layers.rotary import apply_rotary
from compiled_llm.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM


class Qwen3Attention(LlamaAttention):
    def __init__(self, cfg: Any, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx)
        self.q_norm = RMSNorm(self.head_dim, float(cfg.rms_norm_eps))
        self.k_norm = RMSNorm(self.head_dim, float(cfg.rms_norm_eps))

    def project_qk(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rotary(self.q_norm(q), cos, sin), apply_rotary(self.k_norm(k), cos, sin)


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3ForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen3DecoderLayer
