"""Sampler behaviour on fixed logits, and seeded / greedy equivalences end to end."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from compiled_llm import LLM, SamplingParams
from compiled_llm.request import Request
from compiled_llm.sampling.batch import build_sampling_batch
from compiled_llm.sampling.sampler import Sampler, apply_penalties, seeded_uniform

VOCAB = 8
LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])


def make_requests(params: SamplingParams, rows: int, output=()) -> list[Request]:
    requests = []
    for i in range(rows):
        r = Request(f"r{i}", [1, 2, 3], params, max_tokens=16, sampling_seed=1000 + i)
        r.output_token_ids = list(output)
        r.num_pending_output_tokens = 1
        requests.append(r)
    return requests


def sample(params: SamplingParams, rows: int = 4000, logits=LOGITS) -> torch.Tensor:
    requests = make_requests(params, rows)
    batch = build_sampling_batch(requests, VOCAB, torch.device("cpu"))
    return Sampler()(logits.expand(rows, -1).clone(), batch).token_ids


def frequencies(tokens: torch.Tensor) -> torch.Tensor:
    return torch.bincount(tokens, minlength=VOCAB).float() / tokens.numel()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_matches_softmax(temperature: float) -> None:
    freq = frequencies(sample(SamplingParams(temperature=temperature, seed=3)))
    expected = torch.softmax(LOGITS / temperature, dim=0)
    assert torch.allclose(freq, expected, atol=0.03), (freq, expected)


def test_greedy_and_top_k_1() -> None:
    assert set(sample(SamplingParams(temperature=0)).tolist()) == {0}
    assert set(sample(SamplingParams(temperature=1.5, top_k=1, seed=1)).tolist()) == {0}


def test_top_k_top_p_min_p_restrict_support() -> None:
    assert set(sample(SamplingParams(top_k=3, seed=1)).tolist()) == {0, 1, 2}
    probs = torch.softmax(LOGITS, 0)
    # nucleus of 0.7: the smallest prefix of sorted probabilities reaching 0.7
    nucleus = int((probs.cumsum(0) < 0.7).sum()) + 1
    assert set(sample(SamplingParams(top_p=0.7, seed=1)).tolist()) == set(range(nucleus))
    allowed = {i for i in range(VOCAB) if probs[i] >= 0.3 * probs.max()}
    assert set(sample(SamplingParams(min_p=0.3, seed=1)).tolist()) == allowed


def test_top_p_renormalizes_within_nucleus() -> None:
    freq = frequencies(sample(SamplingParams(top_p=0.7, seed=5)))
    probs = torch.softmax(LOGITS, 0)
    kept = probs[:3] / probs[:3].sum()
    assert torch.allclose(freq[:3], kept, atol=0.03)


def test_penalties_on_fixed_logits() -> None:
    params = SamplingParams(
        presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0, seed=0
    )
    requests = make_requests(params, 1, output=[0, 0, 5])  # prompt is [1, 2, 3]
    batch = build_sampling_batch(requests, VOCAB, torch.device("cpu"))
    got = apply_penalties(LOGITS[None].clone(), batch)[0]
    expected = LOGITS.clone()
    for token in (0, 1, 2, 3, 5):  # seen in prompt or output: repetition penalty
        v = expected[token]
        expected[token] = v / 2.0 if v > 0 else v * 2.0
    expected[0] -= 0.25 * 2 + 0.5  # output counts only for frequency / presence
    expected[5] -= 0.25 * 1 + 0.5
    assert torch.allclose(got, expected)


def test_penalties_count_the_token_still_on_the_device() -> None:
    """Async scheduling: a request's newest output token may still be in the step running on the
    device. The penalties must see it exactly as they would if it were on the host."""
    params = SamplingParams(
        presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0, seed=0
    )
    cpu = torch.device("cpu")
    on_host = make_requests(params, 2, output=[0, 0, 5])
    expected = apply_penalties(
        LOGITS.expand(2, -1).clone(), build_sampling_batch(on_host, VOCAB, cpu)
    )
    lagging = make_requests(params, 2, output=[0, 0, 5])
    lagging[0].output_token_ids = [0, 0]  # its 5 is still on the device...
    lagging[0].num_pending_output_tokens = 2  # ...as well as the token this step samples
    in_flight = SimpleNamespace(device_tokens=torch.tensor([7, 5]), row={"r0": 1, "r1": 0})
    got = apply_penalties(
        LOGITS.expand(2, -1).clone(), build_sampling_batch(lagging, VOCAB, cpu, in_flight)
    )
    assert torch.equal(got, expected)


def test_min_tokens_bans_stop_tokens() -> None:
    params = SamplingParams(temperature=0, min_tokens=3)
    params.all_stop_token_ids = {0}
    requests = make_requests(params, 1, output=[4])
    batch = build_sampling_batch(requests, VOCAB, torch.device("cpu"))
    assert Sampler()(LOGITS[None].clone(), batch).token_ids.tolist() == [1]


def test_seeded_noise_is_a_function_of_seed_and_step() -> None:
    seeds = torch.tensor([1, 1, 2])
    steps = torch.tensor([0, 0, 0])
    u = seeded_uniform(seeds, steps, 1000)
    assert torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    assert not torch.equal(u[0], seeded_uniform(seeds[:1], torch.tensor([1]), 1000)[0])
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.02


def test_logprobs_are_raw_log_softmax() -> None:
    requests = make_requests(SamplingParams(temperature=0, logprobs=3), 1)
    batch = build_sampling_batch(requests, VOCAB, torch.device("cpu"))
    out = Sampler()(LOGITS[None].clone(), batch)
    ref = torch.log_softmax(LOGITS, 0)
    assert out.topk_ids is not None and out.topk_ids[0].tolist() == [0, 1, 2]
    assert torch.allclose(out.topk_logprobs[0], ref[:3])
    assert out.sampled_ranks.tolist() == [1]


def test_logit_bias_shifts_the_distribution() -> None:
    """Sampling frequencies follow softmax(logits + bias); greedy takes the biased maximum."""
    bias = {4: 2.5, 0: -1.0}
    freq = frequencies(sample(SamplingParams(logit_bias=bias, seed=7)))
    biased = LOGITS.clone()
    for t, v in bias.items():
        biased[t] += v
    assert torch.allclose(freq, torch.softmax(biased, 0), atol=0.03), freq
    assert set(sample(SamplingParams(temperature=0, logit_bias=bias)).tolist()) == {4}


def test_allowed_token_ids_restrict_support_and_renormalize() -> None:
    freq = frequencies(sample(SamplingParams(allowed_token_ids=[2, 5, 6], seed=9)))
    kept = torch.softmax(LOGITS[[2, 5, 6]], 0)
    assert set(freq.nonzero().flatten().tolist()) <= {2, 5, 6}
    assert torch.allclose(freq[[2, 5, 6]], kept, atol=0.03), freq
    assert set(sample(SamplingParams(temperature=0, allowed_token_ids=[3, 7])).tolist()) == {3}


def test_allowed_and_bias_touch_only_their_rows() -> None:
    """In one batch: a row with allowed ids, one with a bias, one with neither (greedy)."""
    rows = [
        make_requests(SamplingParams(temperature=0, allowed_token_ids=[6]), 1)[0],
        make_requests(SamplingParams(temperature=0, logit_bias={3: 10.0}), 1)[0],
        make_requests(SamplingParams(temperature=0), 1)[0],
    ]
    batch = build_sampling_batch(rows, VOCAB, torch.device("cpu"))
    out = Sampler()(LOGITS.expand(3, -1).clone(), batch)
    assert out.token_ids.tolist() == [6, 3, 0]


def test_logprobs_stay_raw_under_bias() -> None:
    """As in vLLM, logprobs are the model's (before bias and allowed ids), the token biased."""
    params = SamplingParams(temperature=0, logprobs=1, logit_bias={5: 5.0})
    batch = build_sampling_batch(make_requests(params, 1), VOCAB, torch.device("cpu"))
    out = Sampler()(LOGITS[None].clone(), batch)
    assert out.token_ids.tolist() == [5]
    assert torch.allclose(out.sampled_logprobs, torch.log_softmax(LOGITS, 0)[5:6])


@pytest.fixture(scope="module")
def llm(tiny_models) -> LLM:
    return LLM(str(tiny_models("qwen2")), max_model_len=256, enforce_eager=True)


def test_seeded_runs_repeat_and_ignore_batch(llm: LLM) -> None:
    params = SamplingParams(temperature=1.0, top_k=50, seed=1234, max_tokens=20, ignore_eos=True)
    prompts = ["Seeded sampling", "is reproducible", "whatever else is in the batch"]
    alone = llm.generate(prompts[0], params, use_tqdm=False)[0].outputs[0].token_ids
    batched = llm.generate(prompts, params, use_tqdm=False)[0].outputs[0].token_ids
    again = llm.generate(prompts[0], params, use_tqdm=False)[0].outputs[0].token_ids
    assert alone == batched == again
    other = llm.generate(prompts[0], params.clone(seed=99), use_tqdm=False)
    assert other[0].outputs[0].token_ids != alone


def test_top_k_1_equals_greedy_end_to_end(llm: LLM) -> None:
    prompts = ["top-k one", "is the same as greedy decoding"]
    greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    top1 = llm.generate(
        prompts, SamplingParams(temperature=0.9, top_k=1, max_tokens=16), use_tqdm=False
    )
    assert [o.outputs[0].token_ids for o in greedy] == [o.outputs[0].token_ids for o in top1]


def test_logprobs_end_to_end(llm: LLM) -> None:
    out = llm.generate(
        "logprobs", SamplingParams(temperature=0, max_tokens=5, logprobs=2), use_tqdm=False
    )[0].outputs[0]
    assert out.logprobs is not None and len(out.logprobs) == 5
    for token, entry in zip(out.token_ids, out.logprobs):
        assert entry[token].rank == 1  # greedy picks the top token
        assert len(entry) == 2
        assert all(lp.logprob <= 0 for lp in entry.values())
    assert out.cumulative_logprob == pytest.approx(
        sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs))
    )


def test_allowed_token_ids_and_logit_bias_end_to_end(llm: LLM) -> None:
    prompts = ["only these tokens", "may come out"]
    allowed = [7, 11, 13]
    outs = llm.generate(
        prompts,
        SamplingParams(temperature=1.0, seed=3, max_tokens=12, allowed_token_ids=allowed),
        use_tqdm=False,
    )
    assert all(set(o.outputs[0].token_ids) <= set(allowed) for o in outs)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    plain = llm.generate(prompts[0], greedy, use_tqdm=False)[0].outputs[0].token_ids
    pushed = (
        llm.generate(prompts[0], greedy.clone(logit_bias={42: 100.0}), use_tqdm=False)[0]
        .outputs[0]
        .token_ids
    )
    assert pushed == [42] * 6 and plain != pushed
