"""Gemma 2: Llama's skeleton with Gemma's differences.

- RMSNorm scales by (1 + weight), computed in float32 before the cast back (HF's order);
- the embedding is multiplied by sqrt(hidden_size), rounded to the activations' dtype as HF does;
- four norms per layer: after attention and after the MLP too, before each residual add;
- a GELU (tanh approximation) gated MLP;
- softmax scale query_pre_attn_scalar ** -0.5 (`interface.attention_scale`, in the backend spec);
- layers alternate sliding-window and global attention (the config's `layer_types`), every
  layer's scores soft-capped with attn_logit_softcapping, and the final logits with
  final_logit_softcapping.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compiled_llm.models.attention import Attention
from compiled_llm.models.interface import sliding_window
from compiled_llm.models.llama import LlamaAttention, LlamaForCausalLM, LlamaModel


class GemmaRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


def _cap(value: Any) -> float | None:
    return float(value) if value else None


class Gemma2Attention(LlamaAttention):
    def __init__(self, cfg: Any, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx)
        self.attn = Attention(
            layer_idx,
            sliding_window=sliding_window(cfg, layer_idx),
            logits_soft_cap=_cap(getattr(cfg, "attn_logit_softcapping", None)),
        )


class Gemma2MLP(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        act = getattr(cfg, "hidden_activation", None) or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"Gemma 2 with hidden_activation={act!r} is not supported")
        hidden, inter = int(cfg.hidden_size), int(cfg.intermediate_size)
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Gemma2DecoderLayer(nn.Module):
    attention_cls: type[Gemma2Attention] = Gemma2Attention

    def __init__(self, cfg: Any, layer_idx: int) -> None:
        super().__init__()
        hidden, eps = int(cfg.hidden_size), float(cfg.rms_norm_eps)
        self.self_attn = self.attention_cls(cfg, layer_idx)
        self.mlp = Gemma2MLP(cfg)
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), cos, sin))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Gemma2Model(LlamaModel):
    def __init__(
        self, cfg: Any, layer_cls: type[nn.Module], max_positions: int, device: Any
    ) -> None:
        super().__init__(cfg, layer_cls, max_positions, device)
        self.norm = GemmaRMSNorm(int(cfg.hidden_size), float(cfg.rms_norm_eps))
        self.embed_scale = float(cfg.hidden_size) ** 0.5

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        h = h * h.new_tensor(self.embed_scale)  # the scale in h's dtype, as HF rounds it
        cos, sin = self.rotary_emb(positions)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.norm(h)


class Gemma2ForCausalLM(LlamaForCausalLM):
    layer_cls = Gemma2DecoderLayer
    model_cls = Gemma2Model

    def __init__(self, cfg: Any, max_positions: int, device: Any = None) -> None:
        super().__init__(cfg, max_positions, device)
        self.final_logit_soft_cap = _cap(getattr(cfg, "final_logit_softcapping", None))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        cap = self.final_logit_soft_cap
        return logits if cap is None else torch.tanh(logits / cap) * cap
