"""The embedded GGUF is dequantized once; later loads read the converted safetensors, which hold
exactly the dequantized tensors."""

from __future__ import annotations

import os

import pytest
import torch

from compiled_llm.models.loader import (
    default_model_path,
    gguf_side_folder,
    gguf_weights,
    iterate_gguf,
    load_hf_config,
)

NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.29.mlp.down_proj.weight",
    "model.norm.weight",
]


@pytest.mark.slow
def test_gguf_weights_are_converted_once() -> None:
    path = default_model_path()
    config = load_hf_config(path)
    expected = dict(iterate_gguf(path, config, NAMES))
    assert set(expected) == set(NAMES)
    folder = os.path.join(gguf_side_folder(path), "weights")
    before = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    first = dict(gguf_weights(path, config, NAMES))
    (created,) = set(os.listdir(folder)) - before
    file = os.path.join(folder, created, "model.safetensors")
    stamp = os.stat(file).st_mtime_ns
    second = dict(gguf_weights(path, config, NAMES))
    assert os.stat(file).st_mtime_ns == stamp  # read, not written again
    for name, tensor in expected.items():
        assert first[name].dtype == second[name].dtype == torch.float32
        assert torch.equal(first[name], tensor) and torch.equal(second[name], tensor), name
