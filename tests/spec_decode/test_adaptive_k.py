"""Adaptive k (spec_decode/state.py): the rule from recent acceptance to the number of drafts a
request proposes next, and end to end on the tiny cycle model (conftest.py) with a proposer that
drafts the known output (always right) or the known output shifted (always wrong): the wrong
request ends up asking for one draft a step, and every output equals the engine's without
speculation."""

from __future__ import annotations

import pytest

from compiled_llm import LLM, SamplingParams
from compiled_llm.request import Request
from compiled_llm.spec_decode.state import (
    BACKOFF_MAX,
    BACKOFF_START,
    SpecDecodeState,
    StepGate,
    choose_num_drafts,
    expected_tokens,
    step_cost,
)
from tests.spec_decode.conftest import VOCAB, chain
from tests.spec_decode.test_spec_engine import run, same_outputs

K = 4
COST = 0.1


def test_expected_tokens_is_the_truncated_geometric_mean() -> None:
    for a in (0.0, 0.3, 0.5, 0.9):
        for k in range(6):
            closed = (1 - a ** (k + 1)) / (1 - a)
            assert expected_tokens(a, k) == pytest.approx(closed)
    assert expected_tokens(1.0, 4) == 5


def test_rule_by_hand_and_monotone() -> None:
    # tokens / (1 + 0.1 k) at a = 0.5: k=1 1.364, k=2 1.458, k=3 1.442, k=4 1.384 -> 2
    assert choose_num_drafts(0.5, K, COST) == 2
    # a = 0.8: k=4 3.36/1.4 = 2.40 beats k=3 2.95/1.3 = 2.27
    assert choose_num_drafts(0.8, K, COST) == K
    assert choose_num_drafts(1.0, K, COST) == K
    assert choose_num_drafts(0.0, K, COST) == 1
    assert choose_num_drafts(0.05, K, COST) == 1
    assert choose_num_drafts(0.0, K, 0.0) == K  # no price: always the full k
    assert choose_num_drafts(0.5, K, 1.0) == 1  # a draft as dear as a step: one at most
    ks = [choose_num_drafts(i / 100, K, COST) for i in range(101)]
    assert ks == sorted(ks) and ks[0] == 1 and ks[-1] == K
    # the choice is the brute-force argmax
    for i in range(101):
        a = i / 100
        values = [expected_tokens(a, k) / (1 + COST * k) for k in range(1, K + 1)]
        assert values[ks[i] - 1] == pytest.approx(max(values))


def state(cost: float = COST) -> SpecDecodeState:
    return SpecDecodeState(K, draft_token_cost=cost)


def test_high_acceptance_keeps_k() -> None:
    s = state()
    assert s.num_drafts_wanted() == K  # a new request starts with the full k
    for _ in range(20):
        s.on_verified(K, K)
        assert s.num_drafts_wanted() == K
    s.on_verified(K, 3)  # one rejection among many accepted drafts: still worth k
    assert s.num_drafts_wanted() == K


def test_low_acceptance_lowers_k_and_the_estimate_ignores_k() -> None:
    s = state()
    for _ in range(20):
        s.on_verified(K, 1)  # one accepted, then a rejection: a ~ 1/2
    assert s.recent_acceptance == pytest.approx(0.5, abs=1e-3)  # the start forgotten
    assert s.num_drafts_wanted() == 2
    # the same per-token acceptance seen through 2-draft steps gives the same estimate
    t = state()
    for _ in range(20):
        t.on_verified(2, 1)
    assert t.recent_acceptance == pytest.approx(0.5, abs=1e-3)


def test_zero_acceptance_lowers_k_then_recovers() -> None:
    s = state()
    s.on_verified(K, 0)
    assert s.num_drafts_wanted() == 2  # the start (a pseudo-accepted draft) still counts
    s.on_verified(2, 0)
    assert s.num_drafts_wanted() == 1
    for _ in range(5):
        s.on_verified(1, 0)
    assert s.num_drafts_wanted() == 1  # the probe after a pause asks for one draft
    wanted = []
    for _ in range(8):  # acceptance returns: k climbs back to the full k within a few steps
        k = s.num_drafts_wanted()
        s.on_verified(k, k)
        wanted.append(s.num_drafts_wanted())
    assert wanted == sorted(wanted) and wanted[-1] == K
    assert wanted.index(K) <= 5


def pays(s: SpecDecodeState, num_running: int = 1) -> bool:
    """The step gate's test for a batch of requests like `s`."""
    k = s.num_drafts_wanted()
    return num_running * s.expected_gain(k) >= step_cost(num_running, k, s.draft_token_cost)


def test_the_gate_pays_at_fair_acceptance_despite_a_run_of_misses() -> None:
    """At a per-token acceptance of 1/2, three misses in a row are chance (one step in ~14): the
    gate's longer estimate still finds speculating worth it."""
    s = state()
    for _ in range(20):
        s.on_verified(K, 1)
    for _ in range(3):
        s.on_verified(s.num_drafts_wanted(), 0)
    assert s.num_drafts_wanted() == 1 and pays(s) and pays(s, num_running=8)
    z = state()
    for _ in range(6):  # at zero acceptance it closes
        z.on_verified(z.num_drafts_wanted(), 0)
    assert not pays(z) and not pays(z, num_running=8)


def test_gate_pauses_double_probe_and_reset() -> None:
    g = StepGate()
    assert g.open and g.decide(gain=1.0, cost=1.0)
    pauses = []
    for _ in range(5):
        assert not g.decide(gain=0.1, cost=1.0)  # does not pay: a pause, doubling
        pauses.append(g.pause)
        for _ in range(g.pause - 1):
            g.tick(new_request=False)
            assert not g.open
        g.tick(new_request=False)
        assert g.open and g.probe
        assert g.decide(gain=0.1, cost=1.0)  # the probe proposes whatever the estimates
    assert pauses == [BACKOFF_START, 2 * BACKOFF_START, 4 * BACKOFF_START, BACKOFF_MAX, BACKOFF_MAX]
    assert not g.decide(gain=0.1, cost=1.0)
    g.tick(new_request=True)  # a request with nothing proposed yet ends the pause
    assert g.open and g.decide(gain=2.0, cost=1.0)  # and paying resets the doubling
    assert g.next_pause == BACKOFF_START


def test_zero_cost_is_off() -> None:
    s = state(0.0)
    for _ in range(5):
        s.on_verified(K, 0)
        assert s.num_drafts_wanted() == K


# -- end to end ---------------------------------------------------------------------------------

PROMPTS = [
    {"prompt_token_ids": chain(17, 30) + [17]},
    {"prompt_token_ids": chain(5, 12) + [3, 9, 60, 2]},
]
RIGHT = 0  # PROMPTS[0] gets the target's own tokens as drafts, PROMPTS[1] wrong ones


class ScriptedProposer:
    """Drafts from the outputs the engine produces without speculation: the true next tokens for
    PROMPTS[RIGHT], each true token + 1 (never what the target emits) for the others. Records the
    max_drafts it was asked for, per prompt."""

    def __init__(self, expected: dict[tuple[int, ...], list[int]]) -> None:
        self.expected = expected
        self.asked: dict[int, list[int]] = {0: [], 1: []}

    def propose(self, requests: list[Request], max_drafts: list[int]) -> list[list[int]]:
        out = []
        for r, k in zip(requests, max_drafts):
            key = tuple(r.prompt_token_ids)
            which = [tuple(p["prompt_token_ids"]) for p in PROMPTS].index(key)
            self.asked[which].append(k)
            n = len(r.output_token_ids)
            true = self.expected[key][n : n + k]
            out.append(true if which == RIGHT else [(t + 1) % VOCAB for t in true])
        return out


def spec_engine(path, cost: float | None) -> LLM:  # noqa: ANN001
    spec: dict[str, object] = {"method": "ngram", "num_speculative_tokens": K}
    if cost is not None:
        spec["draft_token_cost"] = cost
    return LLM(
        str(path),
        max_model_len=256,
        enforce_eager=True,
        skip_tokenizer_init=True,
        speculative_config=spec,
    )


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=1),
        SamplingParams(temperature=0.9, seed=7, max_tokens=40, ignore_eos=True),
    ],
    ids=["greedy", "seeded-coupled"],
)
def test_always_wrong_drafts_shrink_to_one_outputs_unchanged(cycle_model, params) -> None:  # noqa: ANN001
    plain = LLM(str(cycle_model), max_model_len=256, enforce_eager=True, skip_tokenizer_init=True)
    expected = run(plain, params, PROMPTS)
    by_prompt = {
        tuple(p["prompt_token_ids"]): o.outputs[0].token_ids
        for p, o in zip(PROMPTS, expected, strict=True)
    }
    asked = {}
    for cost in (None, 0.0):  # the default (adaptive) and adaptivity off
        llm = spec_engine(cycle_model, cost)
        proposer = ScriptedProposer(by_prompt)
        assert llm.engine.core.spec is not None
        llm.engine.core.spec.proposer = proposer
        outs = run(llm, params, PROMPTS)
        same_outputs(expected, outs)
        right, wrong = (o.metrics.spec_decode for o in outs)
        assert right is not None and wrong is not None
        assert right.num_accepted_draft_tokens == right.num_draft_tokens > 0
        assert wrong.num_accepted_draft_tokens == 0 and wrong.num_spec_steps >= 2
        asked[cost] = proposer.asked
        if cost is None:
            # the wrong request: from the full k down to one draft a step; the right one keeps k
            wrong_asked = proposer.asked[1]
            assert wrong_asked[0] == K and wrong_asked == sorted(wrong_asked, reverse=True)
            assert wrong_asked[-1] == 1
            assert wrong.num_draft_tokens / wrong.num_spec_steps <= K / 2
        else:
            # the full k, but for the last steps' room before max_tokens
            assert set(proposer.asked[1][:-K]) == {K}
            assert wrong.num_draft_tokens > (K - 1) * wrong.num_spec_steps
        # the right request is asked for k until max_tokens leaves less room
        assert proposer.asked[0][: len(proposer.asked[0]) - 2] == [K] * (len(proposer.asked[0]) - 2)
    assert len(asked[None][1]) == len(asked[0.0][1])  # the same gate decisions either way
