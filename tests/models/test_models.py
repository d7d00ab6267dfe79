"""Greedy outputs equal HF transformers' `generate` (float32) token for token."""

from __future__ import annotations

import os

import pytest
import torch

from compiled_llm import LLM, SamplingParams
from tests.hf_reference import greedy_tokens, hf_greedy

PROMPTS = [
    "Hi",
    "The capital of France is",
    "In a hole in the ground there lived a hobbit. Not a nasty, dirty, wet hole",
    "1 2 3 4 5 6 7",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a land far far away, there was a small village where",
    "Q: What is the boiling point of water?\nA:",
    "Paged attention stores the KV cache in fixed-size blocks so that memory " * 3,
]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_tiny_models_match_hf(kind: str, tiny_models) -> None:
    path = tiny_models(kind)
    expected = greedy_tokens(hf_greedy(path, PROMPTS, max_new_tokens=12))
    llm = LLM(str(path), max_model_len=512, enforce_eager=True)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    free_before = llm.engine.num_free_blocks
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert [o.prompt for o in outputs] == PROMPTS
    assert llm.engine.num_free_blocks == free_before


@pytest.mark.slow
def test_embedded_model_matches_hf() -> None:
    """The embedded GGUF against transformers' own GGUF dequantization and Llama model."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from compiled_llm.models.loader import default_model_path

    path = default_model_path()
    folder, name = os.path.dirname(path), os.path.basename(path)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    hf = LlamaForCausalLM(config).eval()
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=hf)["tensors"]
    hf.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    prompts = PROMPTS[:4]
    expected = greedy_tokens(hf_greedy(hf, prompts, max_new_tokens=16, tokenizer=tokenizer))

    llm = LLM(enforce_eager=True, max_model_len=1024)
    outputs = llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False
    )
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert "Paris" in outputs[1].outputs[0].text
