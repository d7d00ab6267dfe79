"""Model shapes for benchmarks, as HF config dicts (random weights, no download)."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

LLAMA_3_1_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}

# Llama-3.1-70B's published config: the 8B's family at 80 layers, hidden 8192, 64 query heads.
LLAMA_3_1_70B: dict[str, Any] = {
    **LLAMA_3_1_8B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
}

QWEN3_0_6B: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "torch_dtype": "bfloat16",
}

QWEN3_8B: dict[str, Any] = dict(
    QWEN3_0_6B,
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    tie_word_embeddings=False,
)

# Mixture-of-experts shapes (their published configs): 30.5B parameters of which 3.3B active
# per token (128 experts, top 8), and 46.7B with 12.9B active (8 experts, top 2).
QWEN3_30B_A3B: dict[str, Any] = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "torch_dtype": "bfloat16",
}

MIXTRAL_8X7B: dict[str, Any] = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}

# Llama-3.2-1B's dimensions and vocabulary (a draft model for Llama-3.1-8B). Untied embeddings
# where the release ties them, so that benchmarks/spec_decode.py can edit its output head: a
# step reads the same bytes and does the same work either way.
LLAMA_3_2_1B: dict[str, Any] = dict(
    LLAMA_3_1_8B,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
)

# For CPU smoke runs of the scripts.
TINY: dict[str, Any] = dict(
    LLAMA_3_1_8B,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=8192,
    rope_scaling=None,
)

# TINY with one layer (a draft model for TINY in CPU smoke runs).
TINY_DRAFT: dict[str, Any] = dict(TINY, num_hidden_layers=1)

# A tiny Qwen3-MoE for CPU smoke runs.
TINY_MOE: dict[str, Any] = dict(
    QWEN3_30B_A3B,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_experts=8,
    num_experts_per_tok=2,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=512,
    max_position_embeddings=8192,
)

SHAPES = {
    "llama-3.1-8b": LLAMA_3_1_8B,
    "llama-3.2-1b": LLAMA_3_2_1B,
    "llama-3.1-70b": LLAMA_3_1_70B,
    "qwen3-0.6b": QWEN3_0_6B,
    "qwen3-8b": QWEN3_8B,
    "qwen3-30b-a3b": QWEN3_30B_A3B,
    "mixtral-8x7b": MIXTRAL_8X7B,
    "tiny": TINY,
    "tiny-draft": TINY_DRAFT,
    "tiny-moe": TINY_MOE,
}


def shape_folder(name: str) -> str:
    """A folder holding just config.json for the named shape (load with load_format="dummy")."""
    if name not in SHAPES:
        raise SystemExit(f"unknown shape {name!r}; choose from {', '.join(SHAPES)}")
    folder = os.path.join(tempfile.gettempdir(), f"compiled_llm_shape_{name}")
    os.makedirs(folder, exist_ok=True)
    write_if_changed(os.path.join(folder, "config.json"), json.dumps(SHAPES[name]))
    return folder


def write_if_changed(path: str, text: str) -> None:
    """Rewrite a config only when its text changes: the engine's derived-config cache keys on
    the file's mtime, and a rewrite per run would make every warm start re-derive it (importing
    transformers), which a real model folder does not."""
    try:
        with open(path) as f:
            if f.read() == text:
                return
    except OSError:
        pass
    with open(path, "w") as f:
        f.write(text)


def eagle3_head_folder(name: str, draft_vocab: int = 32000) -> str:
    """A folder holding just config.json of an EAGLE-3 head for the named target shape: one
    Llama layer of the target's width, as the published heads (yuhuili/EAGLE3-LLaMA3.1-Instruct-8B:
    LlamaForCausalLMEagle3, draft_vocab_size 32000); load with load_format="dummy". A target of
    fewer than 4 layers (tiny) names its layers, EAGLE-3's default needs 4."""
    target = SHAPES[name]
    layers = int(target["num_hidden_layers"])
    config = dict(
        target,
        architectures=["LlamaForCausalLMEagle3"],
        num_hidden_layers=1,
        draft_vocab_size=min(draft_vocab, int(target["vocab_size"])),
        tie_word_embeddings=False,
    )
    if layers < 4:
        config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": [0, layers // 2, layers - 1]}
    folder = os.path.join(tempfile.gettempdir(), f"compiled_llm_eagle3_head_{name}")
    os.makedirs(folder, exist_ok=True)
    write_if_changed(os.path.join(folder, "config.json"), json.dumps(config))
    return folder


def experts_read(num_experts: int, top_k: int, batch: int) -> float:
    """Experts a decode step of `batch` tokens reads per MoE layer: top_k at batch 1 (exact);
    above, the expected number of distinct experts when each token picks its top_k uniformly
    and independently, num_experts * (1 - (1 - top_k / num_experts) ** batch) (an estimate:
    random weights route about uniformly, trained ones do not)."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** batch)


def weight_bytes(
    name: str, dtype_bytes: int = 2, batch: int = 1, quantization: str | None = None
) -> tuple[int, int]:
    """(bytes of all weights, bytes a decode step of `batch` tokens reads). A step reads every
    weight but the embedding table (only its looked-up rows; a tied table is read as the LM
    head) and, of each MoE layer, the router and only the experts its tokens route to
    (`experts_read`): the *active* parameters, which set an MoE model's decode roofline.
    Counted: q/k/v/o projections, q/k head norms where the family has them, the two layer
    norms, the MLP or router + experts, the final norm, embedding and LM head. With
    `quantization="fp8"` the decoder layers' linear layers (routers included) take 1 byte a
    weight plus a float32 scale per output channel; norms, embeddings, the output head and
    stacked MoE experts (not linear layers) keep `dtype_bytes`."""
    if quantization not in (None, "fp8"):
        raise SystemExit(f"no weight-bytes model for quantization {quantization!r}")
    c = SHAPES[name]
    h, layers = c["hidden_size"], c["num_hidden_layers"]
    head_dim = c.get("head_dim") or h // c["num_attention_heads"]
    q = c["num_attention_heads"] * head_dim
    kv = c["num_key_value_heads"] * head_dim

    def linear(n_in: int, n_out: int) -> int:
        return n_in * n_out + 4 * n_out if quantization == "fp8" else n_in * n_out * dtype_bytes

    qk_norm = 2 * head_dim if c["model_type"] in ("qwen3", "qwen3_moe") else 0
    norms = (qk_norm + 2 * h) * dtype_bytes
    attention = linear(h, q) + 2 * linear(h, kv) + linear(q, h) + norms
    inter = c["intermediate_size"]
    dense_mlp = 2 * linear(h, inter) + linear(inter, h)
    num_experts = c.get("num_experts") or c.get("num_local_experts") or 0
    total = read = 0.0
    for layer in range(layers):
        total += attention
        read += attention
        sparse = (
            num_experts > 0
            and layer not in (c.get("mlp_only_layers") or [])
            and (layer + 1) % c.get("decoder_sparse_step", 1) == 0
        )
        if not sparse:
            total += dense_mlp
            read += dense_mlp
            continue
        expert = 3 * h * (c.get("moe_intermediate_size") or inter) * dtype_bytes
        router = linear(h, num_experts)
        total += router + num_experts * expert
        read += router + experts_read(num_experts, c["num_experts_per_tok"], batch) * expert
    embed = c["vocab_size"] * h * dtype_bytes
    head = 0 if c.get("tie_word_embeddings") else embed
    total += embed + head + h * dtype_bytes
    read += (head or embed) + h * dtype_bytes
    return int(total), int(read)
