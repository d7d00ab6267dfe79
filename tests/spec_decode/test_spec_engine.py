"""N-gram speculative decoding end to end on a tiny CPU model whose text repeats (conftest.py):
greedy and seeded outputs are token-for-token those of the same engine without speculation, with
drafts really accepted and rejected, through async scheduling, -O1, preemption, prefix hits,
chunked prefill, n > 1, penalties, logprobs and stops; no KV block leaks; metrics count it."""

from __future__ import annotations

import random
import re

import pytest

from compiled_llm import LLM, SamplingParams
from compiled_llm.sampling_params import StructuredOutputsParams
from tests.spec_decode.conftest import VOCAB, chain

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}
_rng = random.Random(0)
# Prompts that contain stretches of the model's own chain (drafts found and accepted), noise
# (drafts found and rejected) and nothing (no drafts).
PROMPTS = [
    {"prompt_token_ids": chain(5, 24) + [_rng.randrange(VOCAB) for _ in range(9)] + [5]},
    {"prompt_token_ids": [_rng.randrange(VOCAB) for _ in range(20)]},
    {"prompt_token_ids": chain(17, 40) + [17]},
    {"prompt_token_ids": chain(40, 6) * 3 + [_rng.randrange(VOCAB) for _ in range(30)]},
    {"prompt_token_ids": [9, 9, 9, 9]},
]
GREEDY = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, logprobs=2)


def engine(path, speculative: bool, **kwargs) -> LLM:  # noqa: ANN001
    args = dict(max_model_len=256, enforce_eager=True, skip_tokenizer_init=True)
    args.update(kwargs)
    return LLM(str(path), speculative_config=NGRAM if speculative else None, **args)


def run(llm: LLM, params: SamplingParams | list[SamplingParams], prompts=PROMPTS):  # noqa: ANN001
    free = llm.engine.num_free_blocks
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.num_free_blocks == free  # no KV block leaks
    return outs


def same_outputs(expected, got) -> None:  # noqa: ANN001
    """Same tokens; logprobs equal up to float32 noise (the batch shapes differ)."""
    for a, b in zip(expected, got):
        for ca, cb in zip(a.outputs, b.outputs, strict=True):
            assert cb.token_ids == ca.token_ids
            assert (cb.finish_reason, cb.stop_reason) == (ca.finish_reason, ca.stop_reason)
            if ca.logprobs is None:
                assert cb.logprobs is None
                continue
            for la, lb in zip(ca.logprobs, cb.logprobs, strict=True):
                assert la.keys() == lb.keys()
                for t in la:
                    assert lb[t].logprob == pytest.approx(la[t].logprob, abs=1e-4)
                    assert lb[t].rank == la[t].rank


def acceptance(outs) -> tuple[int, int]:  # noqa: ANN001
    """(drafts verified, drafts accepted) over all requests."""
    metrics = [o.metrics.spec_decode for o in outs if o.metrics.spec_decode is not None]
    return sum(m.num_draft_tokens for m in metrics), sum(
        m.num_accepted_draft_tokens for m in metrics
    )


@pytest.fixture(scope="module")
def baseline(cycle_model):  # noqa: ANN001
    return run(engine(cycle_model, False), GREEDY)


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_greedy_identical_and_drafts_accepted(cycle_model, baseline, async_scheduling) -> None:
    llm = engine(cycle_model, True, async_scheduling=async_scheduling)
    outs = run(llm, GREEDY)
    same_outputs(baseline, outs)
    drafted, accepted = acceptance(outs)
    assert 0 < accepted < drafted  # drafts kept and drafts rolled back, both really happened
    m = outs[2].metrics.spec_decode  # a prompt that is the model's own chain
    assert m is not None and m.mean_acceptance_length > 3 and m.draft_acceptance_rate > 0.8


@pytest.mark.slow
def test_greedy_identical_compiled(cycle_model, baseline) -> None:
    """-O1: verification steps (k + 1 query tokens a request) run the compiled forward."""
    outs = run(engine(cycle_model, True, enforce_eager=False, compilation_level=1), GREEDY)
    same_outputs(baseline, outs)
    assert acceptance(outs)[1] > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.8, seed=11, max_tokens=40, ignore_eos=True, logprobs=1),
        SamplingParams(
            n=2, temperature=1.0, top_k=8, seed=3, max_tokens=32, ignore_eos=True, min_tokens=8
        ),
        SamplingParams(temperature=0.7, seed=5, max_tokens=32, repetition_penalty=1.2),
        SamplingParams(temperature=0, max_tokens=32, frequency_penalty=0.5, ignore_eos=True),
    ],
    ids=["seeded-logprobs", "n2-top_k-min_tokens", "seeded-penalty", "greedy-penalty"],
)
def test_seeded_sampling_and_penalties_identical(cycle_model, params) -> None:
    """Seeded rows draw the noise of their output index, so a seeded request emits exactly the
    tokens it emits without speculation (the same draws, only some checked in one step)."""
    expected = run(engine(cycle_model, False), params)
    outs = run(engine(cycle_model, True), params)
    same_outputs(expected, outs)
    assert acceptance(outs)[1] > 0


def test_mixed_batch_with_stops_preemption_and_chunked_prefill(cycle_model, baseline) -> None:
    """Speculating requests beside others still prefilling in chunks, stop ids and max_tokens
    that fall among accepted drafts, and a KV cache small enough to preempt."""
    stop_at = baseline[2].outputs[0].token_ids[20]  # inside the chain: an accepted draft
    params = [
        GREEDY,
        SamplingParams(temperature=0, max_tokens=13, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=48, stop_token_ids=[stop_at], logprobs=2),
        SamplingParams(temperature=0.9, seed=1, max_tokens=30, ignore_eos=True),
        GREEDY,
    ]
    kwargs = dict(
        num_gpu_blocks_override=32, block_size=4, max_num_batched_tokens=32, max_model_len=128
    )
    expected = run(engine(cycle_model, False, **kwargs), params)
    llm = engine(cycle_model, True, **kwargs)
    outs = run(llm, params)
    same_outputs(expected, outs)
    assert llm.engine.core.scheduler.num_preemptions > 0
    assert outs[2].outputs[0].finish_reason == "stop" and outs[2].outputs[0].stop_reason == stop_at
    assert acceptance(outs)[1] > 0


def test_prefix_cache_after_rollbacks(cycle_model, baseline) -> None:
    """Blocks filled through verification steps serve later requests' prefixes: a prompt that
    is an earlier request's prompt + output hits the cache and continues as without it."""
    llm = engine(cycle_model, True)
    first = run(llm, GREEDY, PROMPTS[2:3])[0]
    assert acceptance([first])[1] > 0
    follow = {"prompt_token_ids": PROMPTS[2]["prompt_token_ids"] + first.outputs[0].token_ids}
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    hit = run(llm, params, [follow])[0]
    assert hit.num_cached_tokens >= 64
    reference = run(engine(cycle_model, False, enable_prefix_caching=False), params, [follow])[0]
    assert hit.outputs[0].token_ids == reference.outputs[0].token_ids


def test_stop_strings(cycle_model) -> None:
    """A stop string the frontend finds in the text of accepted drafts ends the request where it
    ends without speculation (the same text, tokens and finish)."""
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    text = run(engine(cycle_model, False, skip_tokenizer_init=False), params, PROMPTS[2:3])[0]
    text = text.outputs[0].text
    assert len(text) > 12
    stopped = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[text[8:11]])
    expected = run(engine(cycle_model, False, skip_tokenizer_init=False), stopped, PROMPTS[2:3])
    assert expected[0].outputs[0].finish_reason == "stop"
    outs = run(engine(cycle_model, True, skip_tokenizer_init=False), stopped, PROMPTS[2:3])
    same_outputs(expected, outs)
    assert outs[0].outputs[0].text == expected[0].outputs[0].text
    assert acceptance(outs)[1] > 0


@pytest.mark.parametrize("matchers", ["inline", "process"])
def test_structured_outputs_verify_drafts(cycle_model, matchers: str) -> None:
    """Grammar rows verify drafts: each draft row's mask is the grammar's after the drafts before
    it. With the embedded tokenizer the regex allows the printable tokens (17-63) and not the
    special ones (0-16) that the model's chain runs into, and at most 30 of them: drafts are
    accepted along the chain, rejected where it reaches a special token and at the grammar's
    end. Greedy and seeded outputs equal those of the same engine without speculation, and end
    where they do."""
    regex = "[!-O]{0,30}"
    greedy = SamplingParams(temperature=0, max_tokens=48, logprobs=1)
    seeded = SamplingParams(temperature=0.8, seed=7, max_tokens=48, n=2)
    params = [
        p.clone(structured_outputs=StructuredOutputsParams(regex=regex)) for p in (greedy, seeded)
    ]
    both = [params[0]] * len(PROMPTS) + [params[1]] * len(PROMPTS)
    prompts = PROMPTS * 2
    kwargs = dict(skip_tokenizer_init=False, structured_outputs_matchers=matchers)
    expected = run(engine(cycle_model, False, **kwargs), both, prompts)
    outs = run(engine(cycle_model, True, **kwargs), both, prompts)
    same_outputs(expected, outs)
    drafted, accepted = acceptance(outs)
    assert 0 < accepted < drafted
    for out in outs:
        for c in out.outputs:
            assert re.fullmatch(regex, c.text), c.text
            assert c.finish_reason == "stop" or len(c.token_ids) == 48
