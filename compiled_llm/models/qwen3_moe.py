"""Qwen3-MoE: Qwen3's attention (RMSNorm over each head of q and k) with a sparse MoE block in
place of the MLP: softmax over all experts, top `num_experts_per_tok`, renormalized over those
where `norm_topk_prob`. As in HF, a layer is sparse unless it is in `mlp_only_layers` or
`(layer + 1) % decoder_sparse_step` is not 0; those keep a dense MLP of `intermediate_size`
(two kinds of layer, each compiled once)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from compiled_llm.layers.activation import GatedMLP
from compiled_llm.models.moe import ExpertLayout, SparseMoeBlock, check_activation
from compiled_llm.models.qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM


def is_sparse(cfg: Any, layer_idx: int) -> bool:
    """HF's rule for which layers hold experts."""
    step = int(cfg.decoder_sparse_step)
    if step < 1:
        raise ValueError(f"Qwen3-MoE decoder_sparse_step={step}: must be at least 1")
    dense = set(getattr(cfg, "mlp_only_layers", None) or ())
    return layer_idx not in dense and int(cfg.num_experts) > 0 and (layer_idx + 1) % step == 0


class Qwen3MoeDecoderLayer(Qwen3DecoderLayer):
    @staticmethod
    def make_mlp(cfg: Any, layer_idx: int) -> nn.Module:
        check_activation(cfg, "Qwen3-MoE")
        hidden = int(cfg.hidden_size)
        if not is_sparse(cfg, layer_idx):
            return GatedMLP(hidden, int(cfg.intermediate_size))
        return SparseMoeBlock(
            hidden,
            int(cfg.moe_intermediate_size),
            int(cfg.num_experts),
            int(cfg.num_experts_per_tok),
            renormalize=bool(cfg.norm_topk_prob),
        )


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    layer_cls = Qwen3MoeDecoderLayer
    # Hub checkpoints: model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight
    expert_layout = ExpertLayout(
        pattern=r"(?P<prefix>.*\.mlp)\.experts\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight",
        gate="gate_proj",
        up="up_proj",
        down="down_proj",
    )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        super().load_weights(self.expert_layout.stacked(params, weights))
