"""Models with sliding-window attention and soft-capped logits (Mistral with a window, Qwen2 with
use_sliding_window on its upper layers, Gemma 2) against HF transformers' greedy `generate` (float32), with windows shorter than the prompts so
keys really fall out of them: in one batch, in chunked steps mixing prefill chunks over a cached
prefix with decodes, and compiled (-O1) against eager."""

from __future__ import annotations

import pytest
import torch

from compiled_llm import LLM, SamplingParams
from tests.conftest import make_tiny_model
from tests.hf_reference import assert_matches_hf, hf_greedy

WINDOW = 8
# A window shorter than every prompt; Gemma 2's caps low enough to change the results.
MODELS = {
    "mistral": dict(sliding_window=WINDOW),
    # Layer 0 global, layer 1 windowed (HF: layers from max_window_layers on).
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "gemma2": dict(
        sliding_window=WINDOW,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=10.0,
    ),
    # 3 layers, two local then one global; local and global RoPE bases differ, the global one
    # linearly scaled.
    "gemma3": dict(
        num_hidden_layers=3,
        sliding_window=WINDOW,
        sliding_window_pattern=3,
        query_pre_attn_scalar=24,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
        },
    ),
}
PROMPT_LENS = (20, 23, 27, 31, 36, 40)
MAX_TOKENS = 10
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request, tmp_path_factory, embedded_tokenizer_dir):
    kind = request.param
    path = make_tiny_model(
        kind, tmp_path_factory.mktemp(f"window-{kind}"), embedded_tokenizer_dir, **MODELS[kind]
    )
    from transformers import AutoConfig

    ids = prompts(int(AutoConfig.from_pretrained(path).vocab_size))
    return path, ids, hf_greedy(path, ids, MAX_TOKENS)


def generate(llm: LLM, prompt_ids: list[list[int]]) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def test_one_batch_matches_hf(model) -> None:
    path, ids, expected = model
    llm = LLM(str(path), max_model_len=128, enforce_eager=True)
    free_before = llm.engine.num_free_blocks
    assert_matches_hf(expected, generate(llm, ids))
    assert llm.engine.num_free_blocks == free_before


def test_chunked_steps_mixing_prefill_and_decode_match_hf(model) -> None:
    """A 16-token budget: prompts are prefilled in chunks over their cached prefix (a window
    crossing the chunk boundary) while earlier requests decode in the same steps."""
    path, ids, expected = model
    llm = LLM(
        str(path),
        max_model_len=128,
        enforce_eager=True,
        max_num_batched_tokens=16,
        enable_chunked_prefill=True,
        block_size=4,
    )
    assert_matches_hf(expected, generate(llm, ids))


def test_logprobs_match_hf(model) -> None:
    """The sampled tokens' logprobs: Gemma 2's final logit soft-cap changes them (not the
    greedy choice, tanh being monotonic)."""
    path, ids, expected = model
    llm = LLM(str(path), max_model_len=128, enforce_eager=True)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
    for ref, out in zip(expected, outputs, strict=True):
        got = out.outputs[0]
        for pos, (a, b) in enumerate(zip(ref.tokens, got.token_ids)):
            if a != b:
                break
            assert abs(got.logprobs[pos][b].logprob - ref.logprobs[pos]) < 1e-3, pos


@pytest.mark.slow
def test_compiled_equals_eager(model) -> None:
    path, ids, _ = model
    eager = LLM(str(path), max_model_len=128, enforce_eager=True)
    compiled = LLM(str(path), max_model_len=128, compilation_level=1)
    assert compiled.engine.core.runner.compiled is not None
    assert generate(compiled, ids) == generate(eager, ids)


def test_transformers_fallback_matches_hf(model) -> None:
    """The same models through the transformers fallback: the window and soft-cap each HF layer
    passes to its attention function reach our op (and the final soft-cap our logits)."""
    path, ids, expected = model
    llm = LLM(str(path), max_model_len=128, enforce_eager=True, model_impl="transformers")
    native = LLM(str(path), max_model_len=128, enforce_eager=True)
    layers = [e.engine.core.runner.backend.spec.layers for e in (llm, native)]
    assert type(llm.engine.core.runner.model).__name__ == "TransformersForCausalLM"
    assert layers[0] == layers[1] and any(a.features() for a in layers[0])
    assert_matches_hf(expected, generate(llm, ids))
