"""Llama family: Llama 2/3/3.1/3.2 (incl. `llama3` RoPE scaling), Mistral (with its sliding
window), SmolLM. Qwen2 and Qwen3 reuse these blocks with their small differences (see qwen2.py, qwen3.py).

Written for capture: one packed batch `[num_tokens, hidden]` with a position per token, plain
PyTorch ops, and attention through the one opaque op. Parameter names match HF checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from compiled_llm.layers.activation import GatedMLP
from compiled_llm.layers.norm import RMSNorm
from compiled_llm.layers.rotary import RotaryEmbedding, apply_rotary
from compiled_llm.models.attention import Attention
from compiled_llm.models.interface import CausalLM, head_dim, load_parameters, sliding_window


class LlamaAttention(nn.Module):
    def __init__(self, cfg: Any, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        num_heads = int(cfg.num_attention_heads)
        num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or num_heads)
        self.head_dim = head_dim(cfg)
        hidden = int(cfg.hidden_size)
        bias = self.qkv_bias(cfg)
        self.q_proj = nn.Linear(hidden, num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(
            num_heads * self.head_dim, hidden, bias=bool(getattr(cfg, "attention_bias", False))
        )
        self.attn = Attention(layer_idx, sliding_window=sliding_window(cfg, layer_idx))

    @staticmethod
    def qkv_bias(cfg: Any) -> bool:
        return bool(getattr(cfg, "attention_bias", False))

    def project_qk(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Position-encode q and k ([T, heads, head_dim]); Qwen3 normalizes them first."""
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # Head counts come from the projections' widths, not the config, so a transform that
        # narrows the projections (tensor parallelism: compiled_llm/distributed) needs no change
        # here.
        q = self.q_proj(x).unflatten(-1, (-1, self.head_dim))
        k = self.k_proj(x).unflatten(-1, (-1, self.head_dim))
        v = self.v_proj(x).unflatten(-1, (-1, self.head_dim))
        q, k = self.project_qk(q, k, cos, sin)
        o = self.attn(q, k, v)
        return self.o_proj(o.flatten(1))


class LlamaDecoderLayer(nn.Module):
    attention_cls: type[LlamaAttention] = LlamaAttention

    def __init__(self, cfg: Any, layer_idx: int) -> None:
        super().__init__()
        eps = float(cfg.rms_norm_eps)
        self.self_attn = self.attention_cls(cfg, layer_idx)
        self.mlp = self.make_mlp(cfg, layer_idx)
        self.input_layernorm = RMSNorm(int(cfg.hidden_size), eps)
        self.post_attention_layernorm = RMSNorm(int(cfg.hidden_size), eps)

    @staticmethod
    def make_mlp(cfg: Any, layer_idx: int) -> nn.Module:
        """The layer's feed-forward block (MoE families return their sparse block)."""
        return GatedMLP(
            int(cfg.hidden_size), int(cfg.intermediate_size), bool(getattr(cfg, "mlp_bias", False))
        )

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    # Whose RoPE parameters `rotary_emb` takes where the config keeps them per layer type.
    rope_layer_type: str | None = None

    def __init__(
        self, cfg: Any, layer_cls: type[nn.Module], max_positions: int, device: Any
    ) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(int(cfg.vocab_size), int(cfg.hidden_size))
        self.layers = nn.ModuleList([layer_cls(cfg, i) for i in range(int(cfg.num_hidden_layers))])
        self.norm: nn.Module = RMSNorm(int(cfg.hidden_size), float(cfg.rms_norm_eps))
        self.rotary_emb = RotaryEmbedding(
            cfg, head_dim(cfg), max_positions, device, self.rope_layer_type
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.norm(h)


class LlamaForCausalLM(CausalLM):
    """`forward(input_ids [T], positions [T]) -> hidden [T, H]`; `compute_logits` on a subset."""

    layer_cls: type[nn.Module] = LlamaDecoderLayer
    model_cls: type[LlamaModel] = LlamaModel

    def __init__(self, cfg: Any, max_positions: int, device: Any = None) -> None:
        super().__init__()
        self.config = cfg
        self.model = self.model_cls(cfg, self.layer_cls, max_positions, device)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        if not self.tie_word_embeddings:
            self.lm_head = nn.Linear(int(cfg.hidden_size), int(cfg.vocab_size), bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.tie_word_embeddings else self.lm_head.weight
        return torch.nn.functional.linear(hidden, weight).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        tied = self.tie_word_embeddings
        kept = (
            (name, tensor)
            for name, tensor in weights
            if "rotary_emb." not in name and not (tied and name == "lm_head.weight")
        )
        load_parameters(dict(self.named_parameters()), kept, type(self).__name__)


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral is Llama's graph, every layer windowed where the config sets sliding_window."""
