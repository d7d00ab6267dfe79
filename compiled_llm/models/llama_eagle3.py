"""EAGLE-3 draft head for Llama-style targets, in the layout published checkpoints use
(SpecForge/EAGLE's `LlamaForCausalLMEagle3`, vLLM's `Eagle3LlamaForCausalLM`; the facts and
their sources are in docs/speculative_decoding.md, "EAGLE-3"):

- `fc.weight` [hidden, 3 * target_hidden]: combines the three target hidden states into one;
- `midlayer.*`: one Llama decoder layer whose attention reads [input_layernorm(embedding);
  hidden_norm(hidden)], so q/k/v_proj take 2 * hidden; the residual is the un-normed hidden;
- `norm.weight`, `lm_head.weight` [draft_vocab, hidden]: logits over the draft vocabulary;
- `d2t` [draft_vocab]: draft id i is target id i + d2t[i] (`t2d`, the reverse mask, is unused);
- `embed_tokens.weight` only in some checkpoints: otherwise the target's embedding is shared
  (`share_embedding`).

`forward(input_ids, positions)` like every model: the hidden state each token continues from
(the combined target states, or the head's own output at the previous position) is read from
`hidden_in`, a static buffer the proposer fills before each forward (engine/eagle_proposer.py),
so the runner, compiler and CUDA graphs treat the head like any model. It returns the pre-norm
hidden state (what the next draft step continues from); `compute_logits` norms it and maps the
draft vocabulary onto the target's, -inf elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from compiled_llm.layers.activation import GatedMLP
from compiled_llm.layers.norm import RMSNorm
from compiled_llm.layers.rotary import RotaryEmbedding
from compiled_llm.models.interface import CausalLM, head_dim, load_parameters
from compiled_llm.models.llama import LlamaAttention


class Eagle3DecoderLayer(nn.Module):
    """The head's one decoder layer (`midlayer`): attention over the token's embedding and the
    hidden state it continues from, side by side."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        hidden, eps = int(cfg.hidden_size), float(cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, 0)
        bias = LlamaAttention.qkv_bias(cfg)
        for name in ("q_proj", "k_proj", "v_proj"):
            out = getattr(self.self_attn, name).out_features
            setattr(self.self_attn, name, nn.Linear(2 * hidden, out, bias=bias))
        self.mlp = GatedMLP(
            hidden, int(cfg.intermediate_size), bool(getattr(cfg, "mlp_bias", False))
        )
        self.input_layernorm = RMSNorm(hidden, eps)
        self.hidden_norm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)

    def forward(
        self, embeds: torch.Tensor, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        h = hidden + self.self_attn(x, cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3LlamaForCausalLM(CausalLM):
    def __init__(self, cfg: Any, max_positions: int, device: Any = None) -> None:
        super().__init__()
        self.config = cfg
        hidden = int(cfg.hidden_size)
        self.vocab_size = int(cfg.vocab_size)
        self.draft_vocab_size = int(getattr(cfg, "draft_vocab_size", None) or self.vocab_size)
        target_hidden = int(getattr(cfg, "target_hidden_size", None) or hidden)
        # The checkpoint's embedding where it has one (load_weights), else the target's.
        self.embed_tokens: nn.Module | None = None
        self.fc = nn.Linear(3 * target_hidden, hidden, bias=False)
        self.midlayer = Eagle3DecoderLayer(cfg)
        self.norm = RMSNorm(hidden, float(cfg.rms_norm_eps))
        self.lm_head = nn.Linear(hidden, self.draft_vocab_size, bias=False)
        self.rotary_emb = RotaryEmbedding(cfg, head_dim(cfg), max_positions, device)
        # Plain attributes (not loaded, not buffers): target ids of the draft vocabulary (None:
        # the first draft_vocab_size ids), and the hidden-state input (`set_max_tokens`).
        self.draft_to_target: torch.Tensor | None = None
        self.hidden_in = torch.zeros(0, hidden, device=device)

    def set_max_tokens(self, num_tokens: int) -> None:
        """Allocate `hidden_in` for forwards of up to `num_tokens` tokens (before compiling)."""
        self.hidden_in = torch.zeros(
            num_tokens,
            self.fc.out_features,
            dtype=self.fc.weight.dtype,
            device=self.fc.weight.device,
        )

    def share_embedding(self, embedding: nn.Module) -> None:
        """Use the target's embedding (checkpoints without their own)."""
        if self.embed_tokens is None:
            self.embed_tokens = embedding

    def combine(self, target_hidden: torch.Tensor) -> torch.Tensor:
        """[T, 3 * target_hidden] concatenated target states -> [T, hidden]."""
        out: torch.Tensor = self.fc(target_hidden)
        return out

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        assert self.embed_tokens is not None, "share_embedding() first"
        hidden = self.hidden_in[: input_ids.shape[0]]
        cos, sin = self.rotary_emb(positions)
        out: torch.Tensor = self.midlayer(self.embed_tokens(input_ids), hidden, cos, sin)
        return out

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.linear(self.norm(hidden), self.lm_head.weight).float()
        if self.draft_vocab_size == self.vocab_size and self.draft_to_target is None:
            return logits
        targets = self.draft_to_target
        if targets is None:
            targets = torch.arange(self.draft_vocab_size, device=logits.device)
        full = logits.new_full((logits.shape[0], self.vocab_size), float("-inf"))
        full[:, targets] = logits
        return full

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params: dict[str, torch.Tensor] = {}
        device = self.fc.weight.device
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if name == "t2d" or "rotary_emb." in name:
                continue
            if name == "d2t":
                if tuple(tensor.shape) != (self.draft_vocab_size,):
                    raise ValueError(
                        f"checkpoint tensor 'd2t' has shape {tuple(tensor.shape)}, expected "
                        f"({self.draft_vocab_size},) (draft_vocab_size)"
                    )
                base = torch.arange(self.draft_vocab_size, device=device)
                self.draft_to_target = base + tensor.to(device=device, dtype=torch.int64)
                continue
            if name == "embed_tokens.weight":
                self.embed_tokens = nn.Embedding(
                    self.vocab_size, tensor.shape[1], device=device, dtype=self.fc.weight.dtype
                )
            params[name] = tensor
        targets = self.draft_to_target
        if targets is not None and (
            int(targets.min()) < 0 or int(targets.max()) >= self.vocab_size
        ):
            raise ValueError(
                f"checkpoint tensor 'd2t' maps outside the vocabulary {self.vocab_size}"
            )
        load_parameters(dict(self.named_parameters()), params.items(), type(self).__name__)
