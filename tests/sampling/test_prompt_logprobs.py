"""`SamplingParams.prompt_logprobs` (vLLM's): the logprob and rank of every prompt token after
the first, and the top k at its position, against HF transformers' float32 forward of the same
tiny model; across prefill chunks, past the prefix cache, once per request for n > 1."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compiled_llm import LLM, SamplingParams

K = 3
PROMPTS = [
    [1, *range(40, 77)],  # 38 tokens: three chunks of 16
    [1, 5, 9, 300, 301, 302, 17, 17, 17],
]


@pytest.fixture(scope="module")
def model(tiny_models) -> Path:
    return Path(tiny_models("llama"))


@pytest.fixture(scope="module")
def llm(model: Path) -> LLM:
    return LLM(
        str(model),
        max_model_len=128,
        enforce_eager=True,
        enable_chunked_prefill=True,
        max_num_batched_tokens=16,
        block_size=4,
    )


def hf_logprobs(model: Path, ids: list[int]) -> torch.Tensor:
    """log_softmax of HF's logits at every position of `ids` (float32), [len(ids), vocab]."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_matches_hf_across_chunks(llm: LLM, model: Path) -> None:
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=K)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    for ids, out in zip(PROMPTS, outs, strict=True):
        got = out.prompt_logprobs
        assert got is not None and len(got) == len(ids) and got[0] is None
        ref = hf_logprobs(model, ids)
        for pos in range(1, len(ids)):
            row, token, entry = ref[pos - 1], ids[pos], got[pos]
            assert entry is not None and token in entry
            assert entry[token].logprob == pytest.approx(float(row[token]), abs=1e-3), pos
            # rank 1 + the tokens above it, counted with a margin for float rounding (a tiny
            # random model's distribution is flat: thousands of near-ties deep down)
            above = [int((row > row[token] + d).sum()) + 1 for d in (1e-3, -1e-3)]
            assert above[0] <= entry[token].rank <= above[1], pos
            top = {t: lp for t, lp in entry.items() if lp.rank is not None and lp.rank <= K}
            assert len(top) == K
            ref_top = row.topk(K)
            for rank, (value, tid) in enumerate(zip(ref_top.values, ref_top.indices), 1):
                # a near-tie may swap ids between ranks: the values are what must agree
                match = [lp for lp in top.values() if lp.rank == rank]
                assert match and match[0].logprob == pytest.approx(float(value), abs=1e-3)
                assert int(tid) in entry or abs(float(value) - float(ref_top.values[-1])) < 1e-3
        # the prompt tokens' text is decoded as for sampled tokens
        assert all(e is None or e[t].decoded_token is not None for t, e in zip(ids, got))


def test_prefix_cache_is_not_read_for_them(llm: LLM) -> None:
    """A prompt already in the prefix cache is computed again when its logprobs are wanted
    (the cache holds KV, not logits); without prompt_logprobs the same prompt hits the cache."""
    prompt = {"prompt_token_ids": PROMPTS[0]}
    greedy = SamplingParams(temperature=0, max_tokens=1)
    llm.generate(prompt, greedy, use_tqdm=False)
    assert llm.generate(prompt, greedy, use_tqdm=False)[0].num_cached_tokens > 0
    first, again = (
        llm.generate(prompt, greedy.clone(prompt_logprobs=0), use_tqdm=False)[0] for _ in range(2)
    )
    assert again.num_cached_tokens == 0
    assert again.prompt_logprobs is not None and first.prompt_logprobs is not None
    for a, b in zip(first.prompt_logprobs[1:], again.prompt_logprobs[1:], strict=True):
        assert a is not None and b is not None and len(a) == len(b) == 1  # k = 0: the token
        assert list(a) == list(b)
        assert next(iter(a.values())).logprob == pytest.approx(next(iter(b.values())).logprob)


def test_once_per_request_with_n_samples(llm: LLM) -> None:
    prompt = {"prompt_token_ids": PROMPTS[1]}
    one = llm.generate(prompt, SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    two = llm.generate(
        prompt, SamplingParams(n=2, seed=5, max_tokens=3, prompt_logprobs=1), use_tqdm=False
    )[0]
    assert len(two.outputs) == 2
    assert two.prompt_logprobs is not None and one[0].prompt_logprobs is not None
    assert [list(e or {}) for e in two.prompt_logprobs] == [
        list(e or {}) for e in one[0].prompt_logprobs
    ]


def test_without_it_there_are_none(llm: LLM) -> None:
    out = llm.generate("no prompt logprobs", SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert out.prompt_logprobs is None


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_bad_values_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=bad)  # type: ignore[arg-type]
