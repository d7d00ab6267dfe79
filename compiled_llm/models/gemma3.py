"""Gemma 3 (text): Gemma 2's layers with Gemma RMSNorm of q and k per head before RoPE, two RoPE
tables (the config's rope_parameters per layer type: a local base for the sliding-window layers,
the global one, possibly scaled, for the others), five local layers to one global by default
(`layer_types`), and soft-caps only where the config sets them (it does not by default).
Text-only checkpoints (Gemma3ForCausalLM, model_type gemma3_text)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compiled_llm.layers.rotary import RotaryEmbedding, apply_rotary
from compiled_llm.models.gemma2 import (
    Gemma2Attention,
    Gemma2DecoderLayer,
    Gemma2ForCausalLM,
    Gemma2Model,
    GemmaRMSNorm,
)
from compiled_llm.models.interface import head_dim

LAYER_TYPES = ("sliding_attention", "full_attention")


class Gemma3Attention(Gemma2Attention):
    def __init__(self, cfg: Any, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx)
        self.q_norm = GemmaRMSNorm(self.head_dim, float(cfg.rms_norm_eps))
        self.k_norm = GemmaRMSNorm(self.head_dim, float(cfg.rms_norm_eps))

    def project_qk(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rotary(self.q_norm(q), cos, sin), apply_rotary(self.k_norm(k), cos, sin)


class Gemma3DecoderLayer(Gemma2DecoderLayer):
    attention_cls = Gemma3Attention


class Gemma3Model(Gemma2Model):
    rope_layer_type = "full_attention"  # rotary_emb; rotary_emb_local for the windowed layers

    def __init__(
        self, cfg: Any, layer_cls: type[nn.Module], max_positions: int, device: Any
    ) -> None:
        super().__init__(cfg, layer_cls, max_positions, device)
        self.layer_types = tuple(str(t) for t in cfg.layer_types[: len(self.layers)])
        unknown = set(self.layer_types) - set(LAYER_TYPES)
        if unknown:
            raise ValueError(f"Gemma 3 layer types {sorted(unknown)} are not supported")
        self.rotary_emb_local = RotaryEmbedding(
            cfg, head_dim(cfg), max_positions, device, "sliding_attention"
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        h = h * h.new_tensor(self.embed_scale)  # the scale in h's dtype, as HF rounds it
        rope = {
            "full_attention": self.rotary_emb(positions),
            "sliding_attention": self.rotary_emb_local(positions),
        }
        for layer, layer_type in zip(self.layers, self.layer_types, strict=True):
            cos, sin = rope[layer_type]
            h = layer(h, cos, sin)
        return self.norm(h)


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    layer_cls = Gemma3DecoderLayer
    model_cls = Gemma3Model
