"""Mixtral: Mistral's attention (with its sliding window where the config sets one) and a
sparse MoE block in every layer: softmax over `num_local_experts` router logits, the top
`num_experts_per_tok`, renormalized over those (HF's order; the same as a softmax over the
top-k logits)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from compiled_llm.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from compiled_llm.models.moe import ExpertLayout, SparseMoeBlock, check_activation


class MixtralDecoderLayer(LlamaDecoderLayer):
    @staticmethod
    def make_mlp(cfg: Any, layer_idx: int) -> nn.Module:
        check_activation(cfg, "Mixtral")
        return SparseMoeBlock(
            int(cfg.hidden_size),
            int(cfg.intermediate_size),
            int(cfg.num_local_experts),
            int(cfg.num_experts_per_tok),
            renormalize=True,
        )


class MixtralForCausalLM(LlamaForCausalLM):
    layer_cls = MixtralDecoderLayer
    # Hub checkpoints: model.layers.N.block_sparse_moe.{gate, experts.E.w1/w2/w3}.weight, w1 the
    # gate projection, w3 the up one, w2 the down one (transformers 5 renames the block to mlp).
    expert_layout = ExpertLayout(
        pattern=r"(?P<prefix>.*\.block_sparse_moe)\.experts\.(?P<expert>\d+)\.(?P<proj>w1|w2|w3)\.weight",
        gate="w1",
        up="w3",
        down="w2",
        renames=((".block_sparse_moe", ".mlp"),),
    )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        super().load_weights(self.expert_layout.stacked(params, weights))
