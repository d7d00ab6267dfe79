"""The rejection sampler (`acceptance_method` "rejection_sampling", Sampler._verify_drafts) against
an exact oracle: a 6-token vocabulary, fixed target distributions p (LOGITS of
test_verification.py, context-free) and fixed draft distributions q, drafts drawn from q by
torch's own generator (independent of the sampler's noise), N = 6000 seeded requests. The first
emitted token must follow p, a rejected draft's replacement the normalized residual
max(0, p - q), and the first draft must be accepted with probability sum(min(p, q)) = 1 - TV(p, q).
Chi-square tests at significance 0.001, rates within 4 binomial standard deviations; the seeds
are fixed, so the outcome is deterministic."""

from __future__ import annotations

import pytest
import torch

from compiled_llm.request import Request
from compiled_llm.sampling.batch import build_sampling_batch
from compiled_llm.sampling.sampler import Sampler
from compiled_llm.sampling_params import SamplingParams
from compiled_llm.spec_decode.state import SpecDecodeState, num_accepted
from tests.spec_decode.test_verification import ALPHA, LOGITS, VOCAB, N, chi_square_p, requests

# q at the two draft positions: in the first row zero at token 3 (where p is not) and mass at
# token 5 (which p's top_k=5 rules out), in the second all its mass on two tokens.
Q = torch.tensor(
    [
        [0.05, 0.40, 0.30, 0.0, 0.10, 0.15],
        [0.0, 0.2, 0.0, 0.8, 0.0, 0.0],
    ],
    dtype=torch.float64,
)


def with_q(reqs: list[Request], q: torch.Tensor) -> list[Request]:
    """Requests whose drafts were sampled from `q` ([2, V] per request, as the draft model's
    proposer keeps it)."""
    for r, rows in zip(reqs, q):
        r.spec = SpecDecodeState(2)
        r.spec.draft_probs = rows
    return reqs


def draw_drafts(n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    cols = [torch.multinomial(Q[j].float(), n, replacement=True, generator=gen) for j in range(2)]
    return torch.stack(cols, dim=1).tolist()


def verify(
    params: SamplingParams, drafts: list[list[int]], n: int = N
) -> tuple[list[list[int]], list[int]]:
    """(emitted tokens per request, the rows' raw tokens flattened)."""
    reqs = with_q(requests(params, n), Q.float().expand(n, -1, -1))
    batch = build_sampling_batch(reqs, VOCAB, torch.device("cpu"), drafts=drafts)
    assert batch.draft_rows is not None and batch.draft_rows.numel() == 2 * n
    rows = Sampler()(LOGITS.repeat(n, 1), batch).token_ids.view(n, 3).tolist()
    emitted = [row[: num_accepted(d, row) + 1] for d, row in zip(drafts, rows)]
    return emitted, sum(rows, [])


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=1.0, seed=0), SamplingParams(temperature=0.8, top_k=5)],
    ids=["seeded", "unseeded-top_k"],
)
def test_emitted_tokens_follow_p_and_acceptance_is_one_minus_tv(params: SamplingParams) -> None:
    """With top_k=5, p is 0 at token 5, to which q gives mass: such a draft is never kept."""
    drafts = draw_drafts(N)
    emitted, _ = verify(params, drafts)
    p = []
    for j in range(3):
        logits = LOGITS[j].double() / params.temperature
        if params.top_k:
            logits[logits < logits.topk(params.top_k).values[-1]] = float("-inf")
        p.append(logits.softmax(0))
    first = torch.bincount(torch.tensor([e[0] for e in emitted]), minlength=VOCAB)
    assert chi_square_p(first, p[0]) > ALPHA
    second = [e[1] for e in emitted if len(e) >= 2]
    assert chi_square_p(torch.bincount(torch.tensor(second), minlength=VOCAB), p[1]) > ALPHA
    # A rejected first draft is replaced by a draw from max(0, p - q), normalized, and never
    # by the draft itself.
    residual = (p[0] - Q[0]).clamp(min=0)
    residual /= residual.sum()
    replaced = [e[0] for e in emitted if len(e) == 1]
    assert all(e[0] != d[0] for e, d in zip(emitted, drafts) if len(e) == 1)
    counts = torch.bincount(torch.tensor(replaced), minlength=VOCAB)
    assert chi_square_p(counts, residual) > ALPHA
    # Acceptance: 1 - TV(p, q) at the first draft, and again at the second given the first
    # (the target here does not depend on the context).
    for kept, of, rate in [
        (len(second), N, float(torch.minimum(p[0], Q[0]).sum())),
        (
            sum(1 for e in emitted if len(e) == 3),
            len(second),
            float(torch.minimum(p[1], Q[1]).sum()),
        ),
    ]:
        sd = (of * rate * (1 - rate)) ** 0.5
        assert abs(kept - of * rate) < 4 * sd, (kept, of * rate)


def test_seeded_requests_repeat_and_greedy_rows_take_the_argmax() -> None:
    """The acceptance test and the residual draw come from the counter-based noise of the
    request's seed: the same seed twice gives the same tokens, another seed others. A greedy
    request with a q still accepts on argmax match."""
    n = 300
    drafts = draw_drafts(n)
    params = SamplingParams(temperature=1.0, seed=0)
    once, rows = verify(params, drafts, n)
    again, rows_again = verify(params, drafts, n)
    assert once == again and rows == rows_again
    reseeded = with_q(requests(params, n), Q.float().expand(n, -1, -1))
    for r in reseeded:
        r.sampling_seed += 1
    batch = build_sampling_batch(reseeded, VOCAB, torch.device("cpu"), drafts=drafts)
    other = Sampler()(LOGITS.repeat(n, 1), batch).token_ids.tolist()
    assert other != rows

    greedy = SamplingParams(temperature=0)
    drafts = [[int(LOGITS[0].argmax()), 0]]  # the first is the argmax, the second is not
    reqs = with_q(requests(greedy, 1), Q.float()[None])
    batch = build_sampling_batch(reqs, VOCAB, torch.device("cpu"), drafts=drafts)
    sampled = Sampler()(LOGITS.clone(), batch).token_ids.tolist()
    assert sampled == LOGITS.argmax(-1).tolist()
    assert num_accepted(drafts[0], sampled) == 1
