"""Qwen2: Llama's blocks with a bias on the q/k/v projections (and none on o_proj)."""

from __future__ import annotations

from typing import Any

from compiled_llm.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM


class Qwen2Attention(LlamaAttention):
    @staticmethod
    def qkv_bias(cfg: Any) -> bool:
        return True


class Qwen2DecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen2Attention


class Qwen2ForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen2DecoderLayer
