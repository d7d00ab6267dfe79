"""`draft_model` speculative decoding on tiny CPU models (float32, eager): greedy and seeded
outputs are token-for-token those of the same engine without speculation, with drafts really
accepted and rejected, through mixed batches, chunked prefill, preemption, prefix hits and stops;
a target drafting for itself has every draft accepted (which only holds if the draft's KV cache,
caught up and rolled forward through all of that, is right); no KV block leaks. At sampler
level: drafts sampled from a distribution q that is not the target's, with the verification's
noise, keep the target's distribution (chi-square, as test_verification.py)."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from compiled_llm import LLM, SamplingParams
from compiled_llm.config import EngineArgs
from compiled_llm.engine.draft_proposer import DraftModelProposer
from compiled_llm.sampling.batch import build_sampling_batch
from compiled_llm.sampling.sampler import Sampler
from compiled_llm.spec_decode.state import SpecDecodeState, num_accepted
from tests.conftest import make_tiny_model
from tests.spec_decode.conftest import VOCAB, build_cycle_model, chain
from tests.spec_decode.test_spec_engine import acceptance, same_outputs
from tests.spec_decode.test_verification import ALPHA, LOGITS, N, chi_square_p, requests
from tests.spec_decode.test_verification import VOCAB as SMALL_VOCAB

_rng = random.Random(0)
PROMPTS = [
    {"prompt_token_ids": chain(5, 24) + [_rng.randrange(VOCAB) for _ in range(9)] + [5]},
    {"prompt_token_ids": [_rng.randrange(VOCAB) for _ in range(20)]},
    {"prompt_token_ids": chain(17, 40) + [17]},
    {"prompt_token_ids": [9, 9, 9, 9]},
]
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def small_draft(tmp_path_factory: pytest.TempPathFactory, embedded_tokenizer_dir: Path) -> Path:
    """The cycle model's shape with one layer: agrees with the target most of the time."""
    return build_cycle_model(
        tmp_path_factory.mktemp("draft-1layer"), embedded_tokenizer_dir, num_hidden_layers=1
    )


@pytest.fixture(scope="module")
def noise_model(tmp_path_factory: pytest.TempPathFactory, embedded_tokenizer_dir: Path) -> Path:
    """A random tiny Llama with the 64-token vocabulary: every choice depends on the whole
    context (through attention over the KV cache)."""
    return make_tiny_model(
        "llama", tmp_path_factory.mktemp("noise-llama"), embedded_tokenizer_dir, vocab_size=VOCAB
    )


def draft_config(path: Path, k: int = 3, acceptance: str | None = None) -> dict:
    """`acceptance`: speculative_config.acceptance_method (None: the default)."""
    extra = {"acceptance_method": acceptance} if acceptance else {}
    return {"method": "draft_model", "model": str(path), "num_speculative_tokens": k, **extra}


def engine(path, draft=None, acceptance=None, **kwargs) -> LLM:  # noqa: ANN001
    args = dict(max_model_len=256, enforce_eager=True, skip_tokenizer_init=True)
    args.update(kwargs)
    spec = draft_config(draft, acceptance=acceptance) if draft is not None else None
    return LLM(str(path), speculative_config=spec, **args)


def run(llm: LLM, params, prompts=PROMPTS):  # noqa: ANN001
    free = llm.engine.num_free_blocks
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.num_free_blocks == free  # no KV block leaks
    return outs


# --- configuration -------------------------------------------------------------------------------
def test_config_resolves_the_draft_and_refuses_what_does_not_fit(
    cycle_model, small_draft, tmp_path, embedded_tokenizer_dir
) -> None:
    config = EngineArgs(
        model=str(cycle_model), speculative_config=draft_config(small_draft, 4)
    ).create_config()
    spec = config.speculative_config
    assert spec is not None and spec.method == "draft_model" and spec.num_speculative_tokens == 4
    draft = spec.draft_model_config
    assert draft is not None and draft.model == str(small_draft) and draft.num_layers == 1
    assert draft.dtype == config.model_config.dtype
    assert draft.max_model_len == config.model_config.max_model_len
    other_vocab = make_tiny_model(
        "llama", tmp_path, embedded_tokenizer_dir, vocab_size=VOCAB + 1, num_hidden_layers=1
    )
    with pytest.raises(ValueError, match=r"speculative_config.model .*vocab_size=65"):
        EngineArgs(
            model=str(cycle_model), speculative_config=draft_config(other_vocab)
        ).create_config()
    with pytest.raises(ValueError, match="speculative_config.model is required"):
        EngineArgs(speculative_config={"method": "draft_model", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="draft_tensor_parallel_size must be 1"):
        EngineArgs(
            speculative_config={**draft_config(small_draft), "draft_tensor_parallel_size": 2}
        )
    one = {**draft_config(small_draft), "draft_tensor_parallel_size": 1}
    assert EngineArgs(model=str(cycle_model), speculative_config=one).create_config()
    with pytest.raises(ValueError, match="speculative_config.model: model"):
        EngineArgs(
            model=str(cycle_model), speculative_config=draft_config(Path("/nonexistent"))
        ).create_config()


def test_kv_budget_holds_both_caches(cycle_model, small_draft) -> None:
    """kv_cache_memory_bytes pays for both caches: as many blocks each, together within the
    budget, and one block id more would not fit."""
    budget = 1 << 20
    llm = engine(cycle_model, small_draft, kv_cache_memory_bytes=budget)
    runner = llm.engine.core.runner
    assert runner.draft is not None
    caches = [*runner.kv_caches, *runner.draft.kv_caches]
    used = sum(t.numel() * t.element_size() for t in caches)
    num_blocks = llm.engine.core.num_blocks
    assert {t.shape[0] for t in caches} == {num_blocks}
    assert used <= budget < used + used // num_blocks
    # the one-layer draft's cache is a third of the whole (target 2 layers, same heads)
    draft = sum(t.numel() * t.element_size() for t in runner.draft.kv_caches)
    assert 3 * draft == used


# --- exactness end to end ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def baseline(cycle_model):  # noqa: ANN001
    return run(engine(cycle_model), GREEDY)


@pytest.mark.parametrize("draft", ["self", "small", "noise"])
def test_greedy_identical(cycle_model, small_draft, noise_model, baseline, draft) -> None:
    path = {"self": cycle_model, "small": small_draft, "noise": noise_model}[draft]
    llm = engine(cycle_model, path)
    outs = run(llm, GREEDY)
    same_outputs(baseline, outs)
    drafted, accepted = acceptance(outs)
    assert drafted > 0
    if draft == "self":
        assert accepted == drafted
    elif draft == "small":
        assert 0.5 * drafted < accepted < drafted  # mostly right, rejections too
    else:
        assert accepted < 0.5 * drafted  # a draft that knows nothing: mostly rejected


def test_self_draft_kv_through_preemption_chunks_and_prefix_hits(noise_model) -> None:
    """The noise model drafting for itself: its KV cache must hold each request's context at
    every draft step, across chunked prefills, preemptions (recomputed), prefix-cache hits (the
    draft computes what the target found cached) and rolled-back drafts of other requests in
    the same blocks. Any stale or missing entry changes the draft's choices (every choice of
    this model depends on the context), so all drafts being accepted checks all of it."""
    prompts = [
        {"prompt_token_ids": [_rng.randrange(VOCAB) for _ in range(n)]} for n in (5, 37, 70, 12)
    ]
    prompts.append({"prompt_token_ids": prompts[2]["prompt_token_ids"][:48] + [3, 1, 4]})
    params = [
        SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (40, 30, 33, 17, 25)
    ]
    kwargs = dict(
        num_gpu_blocks_override=32, block_size=4, max_num_batched_tokens=32, max_model_len=128
    )
    expected = run(engine(noise_model, **kwargs), params, prompts)
    llm = engine(noise_model, noise_model, **kwargs)
    outs = run(llm, params, prompts)
    same_outputs(expected, outs)
    assert llm.engine.core.scheduler.num_preemptions > 0
    drafted, accepted = acceptance(outs)
    assert drafted > 50 and accepted == drafted
    # a prefix hit: the last prompt shares 48 tokens with the third, run after it
    again = run(llm, params[4], prompts[4:])[0]
    assert again.num_cached_tokens >= 40
    assert again.outputs[0].token_ids == expected[4].outputs[0].token_ids
    drafted, accepted = acceptance([again])
    assert drafted > 0 and accepted == drafted


def test_speculation_starting_mid_generation(noise_model) -> None:
    """With disable_by_batch_size=2 nobody speculates while more than two requests run; when the
    short ones finish, the others start, and the draft first catches up with everything they
    generated meanwhile (in chunks: more than max_num_batched_tokens). n = 2 samples speculate
    apart. Exact, and a self-draft still has every draft accepted."""
    prompts = [{"prompt_token_ids": [_rng.randrange(VOCAB) for _ in range(n)]} for n in (9, 30, 4)]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (6, 80, 30)]
    params[2] = SamplingParams(n=2, temperature=0.7, seed=4, max_tokens=30, ignore_eos=True)
    kwargs = dict(max_num_batched_tokens=24, max_num_seqs=4)
    expected = run(engine(noise_model, **kwargs), params, prompts)
    spec = {**draft_config(noise_model, acceptance="coupled"), "disable_by_batch_size": 2}
    llm = LLM(
        str(noise_model),
        speculative_config=spec,
        max_model_len=256,
        enforce_eager=True,
        skip_tokenizer_init=True,
        **kwargs,
    )
    outs = run(llm, params, prompts)
    same_outputs(expected, outs)
    assert outs[1].metrics.spec_decode is not None
    drafted, accepted = acceptance(outs)
    assert drafted > 20 and accepted == drafted


def test_mixed_batch_with_stops_preemption_and_chunked_prefill(
    cycle_model, small_draft, baseline
) -> None:
    """Speculating requests beside requests that do not (still prefilling in chunks, or left one
    token), stop ids and max_tokens among accepted drafts, and a KV
    cache small enough to preempt."""
    stop_at = baseline[2].outputs[0].token_ids[20]  # inside the chain: an accepted draft
    params = [
        GREEDY,
        SamplingParams(temperature=0, max_tokens=13, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop_at], logprobs=2),
        SamplingParams(temperature=0.9, seed=1, max_tokens=1, ignore_eos=True),
    ]
    kwargs = dict(
        num_gpu_blocks_override=24, block_size=4, max_num_batched_tokens=32, max_model_len=96
    )
    expected = run(engine(cycle_model, **kwargs), params)
    llm = engine(cycle_model, small_draft, **kwargs)
    outs = run(llm, params)
    same_outputs(expected, outs)
    assert llm.engine.core.scheduler.num_preemptions > 0
    assert outs[2].outputs[0].finish_reason == "stop" and outs[2].outputs[0].stop_reason == stop_at
    assert acceptance(outs)[1] > 0


SEEDED = [
    SamplingParams(temperature=0.8, seed=11, max_tokens=32, ignore_eos=True, logprobs=1),
    SamplingParams(temperature=1.0, top_k=8, seed=3, max_tokens=24, min_tokens=8),
    SamplingParams(temperature=1.2, top_p=0.9, seed=5, max_tokens=24, ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
]


@pytest.fixture(scope="module")
def seeded_baseline(cycle_model):  # noqa: ANN001
    return run(engine(cycle_model), SEEDED)


@pytest.mark.parametrize("draft", ["self", "small"])
def test_coupled_seeded_sampling_identical(
    cycle_model, small_draft, seeded_baseline, draft
) -> None:
    """acceptance_method coupled: a seeded request emits what it emits without speculation.
    Drafts are sampled with the noise the target verifies with, so a target drafting for itself
    has every draft accepted even while sampling."""
    path = small_draft if draft == "small" else cycle_model
    outs = run(engine(cycle_model, path, "coupled"), SEEDED)
    same_outputs(seeded_baseline, outs)
    drafted, accepted = acceptance(outs)
    assert (accepted == drafted) if draft == "self" else (0 < accepted < drafted)


@pytest.mark.parametrize("draft", ["self", "small"])
def test_rejection_sampling_end_to_end(cycle_model, small_draft, seeded_baseline, draft) -> None:
    """The default rule (rejection_sampling): the greedy request emits what it emits without
    speculation, the seeded ones the same tokens on every run (a second engine), and a target
    drafting for itself (q = p up to float32 noise between the two runners' batch shapes) has
    its drafts accepted."""
    path = small_draft if draft == "small" else cycle_model
    outs = run(engine(cycle_model, path), SEEDED)
    same_outputs(seeded_baseline[3:], outs[3:])
    same_outputs(outs, run(engine(cycle_model, path), SEEDED))
    drafted, accepted = acceptance(outs)
    assert (accepted >= 0.98 * drafted) if draft == "self" else (0 < accepted < drafted)


def test_seeded_batch_reproducible_after_another_on_the_same_engine(
    cycle_model, noise_model
) -> None:
    """Under rejection sampling a draft changes the token drawn at its position, so a seeded
    batch's tokens depend on which steps carried drafts: the step gate starts over when the engine
    goes idle, and a batch after one that closed it (a draft that knows nothing, every draft
    rejected) emits what it emits on a fresh engine."""
    fresh = run(engine(cycle_model, noise_model), SEEDED)
    llm = engine(cycle_model, noise_model)
    run(llm, GREEDY)
    same_outputs(fresh, run(llm, SEEDED))
    assert acceptance(fresh)[0] > 0


def test_stop_strings(cycle_model, small_draft) -> None:
    """A stop string the frontend finds in the text of accepted drafts ends the request where it
    ends without speculation (the same text, tokens and finish)."""
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    text = run(engine(cycle_model, skip_tokenizer_init=False), params, PROMPTS[2:3])[0]
    text = text.outputs[0].text
    assert len(text) > 12
    stopped = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[text[8:11]])
    expected = run(engine(cycle_model, skip_tokenizer_init=False), stopped, PROMPTS[2:3])
    assert expected[0].outputs[0].finish_reason == "stop"
    outs = run(engine(cycle_model, small_draft, skip_tokenizer_init=False), stopped, PROMPTS[2:3])
    same_outputs(expected, outs)
    assert outs[0].outputs[0].text == expected[0].outputs[0].text
    assert acceptance(outs)[1] > 0


@pytest.mark.slow
def test_compiled_draft(cycle_model, small_draft, baseline) -> None:
    """-O1: the draft's forward is compiled too (its own compile-cache entry)."""
    llm = engine(cycle_model, small_draft, enforce_eager=False, compilation_level=1)
    draft = llm.engine.core.runner.draft
    assert draft is not None and draft.compiled is not None
    outs = run(llm, GREEDY)
    same_outputs(baseline, outs)
    assert acceptance(outs)[1] > 0


# --- distribution --------------------------------------------------------------------------------
# The draft's distribution q at the first two positions: not the target's (LOGITS).
DRAFT_LOGITS = torch.tensor(
    [
        [0.2, 1.5, 0.9, -0.5, 0.4, 0.0],
        [0.3, 0.6, -0.2, 1.3, 0.0, 0.1],
    ]
)


# An EAGLE-3 head's q: logits over its draft vocabulary mapped onto the target's, -inf for the
# tokens outside it (here 1 and 3, to which the target gives mass).
REDUCED_DRAFT_LOGITS = DRAFT_LOGITS.index_fill(1, torch.tensor([1, 3]), float("-inf"))


def draft_with_the_proposer(
    reqs: list, draft_logits: torch.Tensor, rejection_sampling: bool
) -> list[list[int]]:
    """Two drafts per request sampled from q (`draft_logits` rows) by DraftModelProposer's own
    sampling code (`_draw`, `_keep_q`: its noise stream, and under rejection_sampling q's rows
    kept in each request's `spec.draft_probs`), without a model."""
    proposer = DraftModelProposer.__new__(DraftModelProposer)
    proposer.draft = SimpleNamespace(device=torch.device("cpu"))  # type: ignore[assignment]
    proposer.vocab_size = SMALL_VOCAB
    proposer.sampler = Sampler()
    proposer.rejection_sampling = rejection_sampling
    proposer._batches, proposer._q = {}, []
    for r in reqs:
        r.spec = SpecDecodeState(2)
        r.num_pending_output_tokens = 0  # drafting happens before the step is scheduled
    cols = [proposer._draw(draft_logits[j].repeat(N, 1), reqs, j) for j in range(2)]
    proposer._keep_q(reqs, [2] * len(reqs))
    for r in reqs:
        r.num_pending_output_tokens = 1
    return torch.stack(cols, dim=1).tolist()


@pytest.mark.parametrize("rule", ["rejection_sampling", "coupled"])
@pytest.mark.parametrize("draft_vocab", ["full", "reduced"])
@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=0.9, seed=0), SamplingParams(temperature=1.0)],
    ids=["seeded", "unseeded"],
)
def test_drafts_from_q_keep_the_target_distribution(
    params: SamplingParams, draft_vocab: str, rule: str
) -> None:
    """Drafts are sampled from q as DraftModelProposer samples them, then verified by the
    target's ordinary step. The target here does not depend on the context (LOGITS rows), so
    the emitted tokens at positions 0, 1, 2 must follow its three rows. "reduced": q of an
    EAGLE-3 head's smaller draft vocabulary (eagle3), zero where p is not. rejection_sampling
    accepts the first draft with probability 1 - TV(p, q). coupled: the drafts are drawn with
    the verification's noise, so every emitted token is exactly what the target samples at that
    index without drafts, and coupling the noise gets drafts from a q != p accepted more often
    than independent draws would be (sum p q), at least (1 - TV) / (1 + TV)."""
    draft_logits = DRAFT_LOGITS if draft_vocab == "full" else REDUCED_DRAFT_LOGITS
    cpu = torch.device("cpu")
    sampler = Sampler()
    reqs = requests(params)
    if params.seed is None:  # the frontend's random sampling_seed (here fixed ones)
        seeds = random.Random(2)
        for r in reqs:
            r.sampling_seed = seeds.getrandbits(63)
    drafts = draft_with_the_proposer(reqs, draft_logits, rule == "rejection_sampling")
    batch = build_sampling_batch(reqs, SMALL_VOCAB, cpu, drafts=drafts)
    assert (batch.draft_rows is not None) == (rule == "rejection_sampling")
    sampled = sampler(LOGITS.repeat(N, 1), batch).token_ids.view(N, 3).tolist()
    emitted = [row[: num_accepted(d, row) + 1] for d, row in zip(drafts, sampled)]

    t = params.temperature
    p = [(LOGITS[j].double() / t).softmax(0) for j in range(3)]
    q = [(draft_logits[j].double() / t).softmax(0) for j in range(2)]
    for j in range(3):
        tokens = torch.tensor([e[j] for e in emitted if len(e) > j])
        assert len(tokens) > 300
        assert chi_square_p(torch.bincount(tokens, minlength=SMALL_VOCAB), p[j]) > ALPHA
    accepted = sum(1 for e in emitted if len(e) > 1) / N
    overlap = float(torch.minimum(p[0], q[0]).sum())  # 1 - total variation
    sd = (overlap * (1 - overlap) / N) ** 0.5
    if rule == "rejection_sampling":
        assert abs(accepted - overlap) < 4 * sd, (accepted, overlap)
        return
    # pathwise: each emitted token is the target's own draw at that index
    for j in range(3):
        plain = build_sampling_batch(reqs, SMALL_VOCAB, cpu, drafts=[[] for _ in reqs])
        plain = dataclasses.replace(plain, steps=plain.steps + j)
        alone = sampler(LOGITS[j].repeat(N, 1), plain).token_ids.tolist()
        assert all(e[j] == a for e, a in zip(emitted, alone) if len(e) > j)
    independent = float((p[0] * q[0]).sum())
    sd = (0.25 / N) ** 0.5
    assert accepted > independent + 10 * sd
    assert accepted > overlap / (2 - overlap) - 4 * sd  # the coupling's guarantee
