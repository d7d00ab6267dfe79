"""Verification of drafts by the ordinary sampler: row j of a request samples the token after its
first j drafts, and the drafts are kept while the sampled tokens equal them
(`spec_decode.state.num_accepted`). For a point-mass draft that is the rejection-sampling rule;
these tests check the emitted tokens' distribution against the target's, computed in float64, by
chi-square tests at significance 0.001 over N = 6000 fixed-seed draws (deterministic: the seeds
are fixed, so a pass is not luck that can change between runs)."""

from __future__ import annotations

import pytest
import torch

from compiled_llm.request import Request
from compiled_llm.sampling.batch import build_sampling_batch
from compiled_llm.sampling.sampler import Sampler
from compiled_llm.sampling_params import SamplingParams
from compiled_llm.spec_decode.state import num_accepted

VOCAB = 6
N = 6000
ALPHA = 1e-3
# Target logits at the three positions of a request with two drafts.
LOGITS = torch.tensor(
    [
        [1.2, 0.9, 0.3, 0.0, -0.4, -2.0],
        [0.1, 1.4, -0.3, 0.8, 0.2, -1.0],
        [0.5, -0.5, 1.0, 0.0, 0.7, 0.3],
    ]
)
DRAFTS = [1, 3]


def requests(params: SamplingParams, n: int = N) -> list[Request]:
    out = []
    for i in range(n):
        r = Request(f"r{i}", [0, 5], params, max_tokens=8, sampling_seed=7919 * i + 11)
        r.num_pending_output_tokens = 1  # scheduled: the first row samples output index 0
        out.append(r)
    return out


def target(params: SamplingParams, position: int) -> torch.Tensor:
    """The distribution the sampler draws from at `position` (drafts before it as output), in
    float64: penalties, temperature, top-k."""
    logits = LOGITS[position].double().clone()
    for t in DRAFTS[:position]:
        logits[t] -= params.frequency_penalty
    logits = logits / params.temperature
    if params.top_k:
        kth = logits.topk(params.top_k).values[-1]
        logits[logits < kth] = float("-inf")
    return logits.softmax(0)


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of observed `counts` under `probs` (cells of probability 0 must be empty)."""
    assert counts[probs == 0].sum() == 0, "a token of probability 0 was emitted"
    support = probs > 0
    total = counts.sum().double()
    expected = total * probs[support]
    stat = ((counts[support].double() - expected) ** 2 / expected).sum()
    df = int(support.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), stat / 2))


def verify(params: SamplingParams) -> list[list[int]]:
    reqs = requests(params)
    batch = build_sampling_batch(reqs, VOCAB, torch.device("cpu"), drafts=[DRAFTS] * N)
    sampled = Sampler()(LOGITS.repeat(N, 1), batch).token_ids.view(N, 3).tolist()
    return [row[: num_accepted(DRAFTS, row) + 1] for row in sampled]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.9, top_k=5, seed=0),
        SamplingParams(temperature=1.3, frequency_penalty=0.7, seed=0),
        SamplingParams(temperature=1.0),  # unseeded: the noise of sampling_seed (random)
    ],
    ids=["seeded-top_k", "seeded-penalty", "unseeded"],
)
def test_emitted_tokens_follow_the_target_distribution(params: SamplingParams) -> None:
    torch.manual_seed(0)
    emitted = verify(params)
    p = [target(params, j) for j in range(3)]
    # The first token is distributed as the target's first position, whatever the draft.
    first = torch.bincount(torch.tensor([e[0] for e in emitted]), minlength=VOCAB)
    assert chi_square_p(first, p[0]) > ALPHA
    # Given the first draft kept, the second token follows the second position, and so on.
    second = [e[1] for e in emitted if len(e) >= 2]
    third = [e[2] for e in emitted if len(e) == 3]
    assert chi_square_p(torch.bincount(torch.tensor(second), minlength=VOCAB), p[1]) > ALPHA
    assert chi_square_p(torch.bincount(torch.tensor(third), minlength=VOCAB), p[2]) > ALPHA
    # A rejected first draft is replaced by a token of p without it, renormalized.
    rejected = [e[0] for e in emitted if e[0] != DRAFTS[0]]
    residual = p[0].clone()
    residual[DRAFTS[0]] = 0
    residual /= residual.sum()
    assert chi_square_p(torch.bincount(torch.tensor(rejected), minlength=VOCAB), residual) > ALPHA
    # Acceptance rates: p0(d0), then p0(d0) p1(d1), within 4 standard deviations.
    for accepted, prob in [
        (len(second), float(p[0][DRAFTS[0]])),
        (len(third), float(p[0][DRAFTS[0]] * p[1][DRAFTS[1]])),
    ]:
        sd = (N * prob * (1 - prob)) ** 0.5
        assert abs(accepted - N * prob) < 4 * sd, (accepted, N * prob)


def test_seeded_rows_draw_what_a_step_without_drafts_would() -> None:
    """Row j of a seeded request uses the noise of output index base + j, with the drafts before
    it as output: exactly the draw of an ordinary step at that index. So a seeded request emits
    the same tokens with and without speculation."""
    params = SamplingParams(temperature=1.1, top_p=0.9, repetition_penalty=1.3, seed=0)
    n = 200
    reqs = requests(params, n)
    batch = build_sampling_batch(reqs, VOCAB, torch.device("cpu"), drafts=[DRAFTS] * n)
    spec = Sampler()(LOGITS.repeat(n, 1), batch).token_ids.view(n, 3)
    for j in range(3):
        plain = requests(params, n)
        for r in plain:
            r.output_token_ids = list(DRAFTS[:j])
        batch = build_sampling_batch(plain, VOCAB, torch.device("cpu"))
        alone = Sampler()(LOGITS[j].expand(n, -1).clone(), batch).token_ids
        assert torch.equal(spec[:, j], alone)


def test_greedy_rows_keep_drafts_equal_to_the_argmax() -> None:
    reqs = requests(SamplingParams(temperature=0), 1)
    drafts = [[int(LOGITS[0].argmax()), 0]]  # the first is the argmax, the second is not
    batch = build_sampling_batch(reqs, VOCAB, torch.device("cpu"), drafts=drafts)
    sampled = Sampler()(LOGITS.clone(), batch).token_ids.tolist()
    assert sampled == LOGITS.argmax(-1).tolist()
    assert num_accepted(drafts[0], sampled) == 1


def test_min_tokens_bans_stop_ids_per_row() -> None:
    """Row j samples output index j: with min_tokens=2 the stop id is banned in rows 0 and 1
    only."""
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[0])
    reqs = requests(params, 1)
    logits = torch.full((3, VOCAB), -1.0)
    logits[:, 0] = 5.0  # the stop id is the argmax everywhere
    batch = build_sampling_batch(reqs, VOCAB, torch.device("cpu"), drafts=[[1, 1]])
    sampled = Sampler()(logits, batch).token_ids.tolist()
    assert sampled[0] != 0 and sampled[1] != 0 and sampled[2] == 0
