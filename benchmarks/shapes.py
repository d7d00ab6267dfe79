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

SHAPES = {
    "llama-3.1-8b": LLAMA_3_1_8B,
    "qwen3-0.6b": QWEN3_0_6B,
    "qwen3-8b": QWEN3_8B,
    "tiny": TINY,
}


def shape_folder(name: str) -> str:
    """A folder holding just config.json for the named shape (load with load_format="dummy")."""
    if name not in SHAPES:
        raise SystemExit(f"unknown shape {name!r}; choose from {', '.join(SHAPES)}")
    folder = os.path.join(tempfile.gettempdir(), f"compiled_llm_shape_{name}")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(SHAPES[name], f)
    return folder


def weight_bytes(
    name: str, dtype_bytes: int = 2, quantization: str | None = None
) -> tuple[int, int]:
    """(bytes of all weights, bytes a decode step reads: all but the embedding table). With
    `quantization="fp8"` the decoder layers' linear weights take 1 byte a parameter plus a
    float32 scale per output channel; norms, embeddings and the output head keep
    `dtype_bytes`."""
    c = SHAPES[name]
    h, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    head_dim = c.get("head_dim") or h // c["num_attention_heads"]
    q = c["num_attention_heads"] * head_dim
    kv = c["num_key_value_heads"] * head_dim
    linear = h * (q + 2 * kv) + q * h + 3 * h * inter
    if quantization == "fp8":
        outputs = (q + 2 * kv) + h + 2 * inter + h  # one float32 scale per output channel
        per_layer = linear + 4 * outputs + 2 * h * dtype_bytes
    elif quantization is None:
        per_layer = (linear + 2 * h) * dtype_bytes
    else:
        raise SystemExit(f"no weight-bytes model for quantization {quantization!r}")
    embed = c["vocab_size"] * h * dtype_bytes
    head = 0 if c.get("tie_word_embeddings") else embed
    total = layers * per_layer + embed + head + h * dtype_bytes
    read = layers * per_layer + (head or embed) + h * dtype_bytes
    return total, read
