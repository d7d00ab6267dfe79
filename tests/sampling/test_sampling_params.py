"""The offline API refuses what the server refuses: SamplingParams and the input processor raise
ValueError naming the field, and nothing is queued."""

from __future__ import annotations

import math

import pytest

from compiled_llm import LLM, SamplingParams

BAD_PARAMS = [
    ("seed", 2**63),
    ("seed", -(2**63) - 1),
    ("seed", 1.5),
    ("n", True),
    ("n", 0),
    ("max_tokens", 2**64),
    ("max_tokens", 4.0),
    ("min_tokens", -1),
    ("top_k", 2**63),
    ("logprobs", False),
    ("temperature", math.inf),
    ("top_p", math.nan),
    ("repetition_penalty", math.inf),
    ("presence_penalty", True),
    ("stop_token_ids", [True]),
    ("stop_token_ids", [2**63]),
    ("stop", [""]),
    ("logit_bias", {True: 1.0}),
    ("logit_bias", {1: math.inf}),
    ("logit_bias", [1]),
    ("allowed_token_ids", []),
    ("allowed_token_ids", [-1]),
    ("truncate_prompt_tokens", 0),
    ("truncate_prompt_tokens", -2),
    ("truncate_prompt_tokens", 1.5),
]


@pytest.mark.parametrize("field,value", BAD_PARAMS, ids=[f"{f}={v!r}" for f, v in BAD_PARAMS])
def test_sampling_params_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"^{field} "):
        SamplingParams(**{field: value})  # type: ignore[arg-type]


def test_extreme_seeds_are_valid_and_fold_for_n() -> None:
    top = SamplingParams(seed=2**63 - 1, n=3)
    assert [top.sample_seed(i) for i in range(3)] == [2**63 - 1, 0, 1]
    bottom = SamplingParams(seed=-(2**63))
    assert bottom.sample_seed(0) == 0
    assert SamplingParams(seed=5).sample_seed(2) == 7  # in range: unchanged
    assert SamplingParams().sample_seed(0) is None


@pytest.fixture(scope="module")
def llm(tiny_models) -> LLM:
    return LLM(str(tiny_models("llama")), max_model_len=64, enforce_eager=True)


BAD_INPUTS = [
    ("prompt", "a\ud800b", {}),
    ("prompt_token_ids", {"prompt_token_ids": [1, True]}, {}),
    ("prompt_token_ids", {"prompt_token_ids": [10**9]}, {}),
    ("stop_token_ids", "hello", {"stop_token_ids": [10**9]}),
    ("logit_bias", "hello", {"logit_bias": {10**9: 1.0}}),
    ("allowed_token_ids", "hello", {"allowed_token_ids": [10**9]}),
    ("min_tokens", "hello", {"min_tokens": 100, "max_tokens": None}),
    ("max_tokens", "hello", {"max_tokens": 100}),
    # over max_logprobs (20): a top-k past the vocabulary crashed the engine
    ("logprobs", "hello", {"logprobs": 21}),
    ("logprobs", "hello", {"logprobs": 10**6}),
    ("prompt_logprobs", "hello", {"prompt_logprobs": 10**6}),
]


@pytest.mark.parametrize("field,prompt,params", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_generate_refuses_and_queues_nothing(
    llm: LLM, field: str, prompt: object, params: dict[str, object]
) -> None:
    free = llm.engine.num_free_blocks
    with pytest.raises(ValueError, match=f"^{field}"):
        llm.generate([prompt, "fine"], SamplingParams(**params), use_tqdm=False)  # type: ignore[arg-type, list-item]
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.num_free_blocks == free


@pytest.mark.parametrize("bad", [{"max_tokens": 2}, ["not params"], "abc"])
def test_sampling_params_must_be_sampling_params(llm: LLM, bad: object) -> None:
    with pytest.raises(ValueError, match="^sampling_params must be a SamplingParams"):
        llm.generate(["a"], bad, use_tqdm=False)  # type: ignore[arg-type]
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("priority", [True, 2**63, 1.0])
def test_priority_must_be_a_64_bit_integer(llm: LLM, priority: object) -> None:
    with pytest.raises(ValueError, match="^priority"):
        llm.generate("hello", SamplingParams(max_tokens=2), use_tqdm=False, priority=[priority])  # type: ignore[list-item]
    assert not llm.engine.has_unfinished_requests()


def test_max_logprobs(tiny_models) -> None:
    """vLLM's max_logprobs: -1 allows the whole vocabulary (and no more), and the engine keeps
    serving after a refusal."""
    llm = LLM(str(tiny_models("llama")), max_model_len=64, enforce_eager=True, max_logprobs=-1)
    vocab = llm.engine.processor.vocab_size
    out = llm.generate("hi", SamplingParams(max_tokens=1, logprobs=vocab), use_tqdm=False)[0]
    entry = out.outputs[0].logprobs[0]  # type: ignore[index]
    assert len(entry) == vocab
    assert sum(math.exp(lp.logprob) for lp in entry.values()) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="^prompt_logprobs=.* exceeds"):
        llm.generate("hi", SamplingParams(prompt_logprobs=vocab + 1), use_tqdm=False)
    assert llm.generate("hi", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="max_logprobs"):
        LLM(str(tiny_models("llama")), max_logprobs=-2)


def test_seeded_n_at_the_top_of_the_range_runs(llm: LLM) -> None:
    params = SamplingParams(n=2, seed=2**63 - 1, temperature=1.0, max_tokens=4, ignore_eos=True)
    (out,) = llm.generate("hello", params, use_tqdm=False)
    assert [len(c.token_ids) for c in out.outputs] == [4, 4]
    again = SamplingParams(n=1, seed=0, temperature=1.0, max_tokens=4, ignore_eos=True)
    # sample 1 of the first request folded to seed 0: the same draws
    assert (
        llm.generate("hello", again, use_tqdm=False)[0].outputs[0].token_ids
        == out.outputs[1].token_ids
    )


def test_truncate_prompt_tokens_keeps_the_last_tokens(llm: LLM) -> None:
    """As in vLLM: the request runs on the last k prompt tokens (and reports those); -1 keeps
    as many as fit with one generated token, so an over-long prompt is no longer refused."""
    prompt = list(range(3, 23))
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    (cut,) = llm.generate(
        {"prompt_token_ids": prompt}, greedy.clone(truncate_prompt_tokens=5), use_tqdm=False
    )
    (tail,) = llm.generate({"prompt_token_ids": prompt[-5:]}, greedy, use_tqdm=False)
    assert cut.prompt_token_ids == prompt[-5:]
    assert cut.outputs[0].token_ids == tail.outputs[0].token_ids
    long = {"prompt_token_ids": [3 + i % 50 for i in range(100)]}  # max_model_len is 64
    with pytest.raises(ValueError, match="^prompt"):
        llm.generate(long, greedy, use_tqdm=False)
    (fit,) = llm.generate(
        long, greedy.clone(max_tokens=1, truncate_prompt_tokens=-1), use_tqdm=False
    )
    assert fit.prompt_token_ids == long["prompt_token_ids"][-63:]
    assert len(fit.outputs[0].token_ids) == 1
