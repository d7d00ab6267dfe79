"""What speculative decoding tracks: per request its drafts, its acceptance and how many drafts
to propose next (adaptive k); per engine whether a step carries drafts at all (`StepGate`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Adaptive k: the per-token acceptance a request's drafts have had lately is estimated from
# exponentially decayed sums over its verification steps (each step's weight is multiplied by
# ACCEPTANCE_DECAY at every later one: about the last 1 / (1 - 0.7) ~ 3 steps count). A new
# request starts from one pseudo-accepted draft and no rejection, i.e. an estimate of 1 (full k).
ACCEPTANCE_DECAY = 0.7
# The step gate's estimate of the same acceptance, over about the last 10 verification steps:
# whether speculating pays is decided on less noise than how many drafts to ask for.
GATE_ACCEPTANCE_DECAY = 0.9

# The step gate (StepGate): a step that verifies drafts costs every running request about this
# much of a decode step more than one without (the synchronous step, the acceptance), whatever k;
# H200, 8B target, batch 1 and 8: 0.2-0.35 (benchmarks/spec_decode_policy.py). When the running
# requests' expected extra tokens do not pay for it, no request proposes for a pause of steps that
# starts at BACKOFF_START and doubles each time the gate closes again before it has been open,
# up to BACKOFF_MAX; after a pause one probe step proposes regardless, to re-estimate.
VERIFY_STEP_COST = 0.2
BACKOFF_START = 8
BACKOFF_MAX = 64


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a verification step with k drafts emits on average when each draft is accepted
    with probability `acceptance` given the ones before: 1 + a + ... + a^k."""
    return sum(acceptance**j for j in range(k + 1))


def choose_num_drafts(acceptance: float, max_k: int, draft_token_cost: float) -> int:
    """The k in 1..max_k that maximizes tokens per cost, expected_tokens(a, k) / (1 + c * k),
    with c = draft_token_cost the price of one more draft in a step (the verification of one
    more query token plus proposing it), in units of a decode step without drafts. Ties go to
    the larger k, so c = 0 always gives max_k (adaptivity off). k = 0 is not chosen here: the
    step gate (StepGate) turns proposing off when speculation does not pay."""
    best, best_value = max_k, -1.0
    for k in range(max_k, 0, -1):
        value = expected_tokens(acceptance, k) / (1 + draft_token_cost * k)
        if value > best_value * (1 + 1e-12):
            best, best_value = k, value
    return best


def num_accepted(drafts: list[int], sampled: list[int]) -> int:
    """How many leading drafts the target sampled too: draft j is kept when the token the target
    sampled at its position (given every earlier draft) is that draft. For a point-mass draft
    this is exactly the rejection-sampling rule (accept with probability p(draft), else a token
    from p without the draft), since P(sampled == draft) = p(draft) and a sample conditioned on
    differing from the draft is distributed as p without it, renormalized. Greedy rows sample
    the argmax, so this is the argmax match."""
    n = 0
    for d, t in zip(drafts, sampled):
        if d != t:
            break
        n += 1
    return n


@dataclass
class SpecDecodeState:
    """Per-request speculation state (Request.spec; None when speculation is off)."""

    num_speculative_tokens: int
    # adaptive k (choose_num_drafts): the price of one draft; 0 proposes num_speculative_tokens
    draft_token_cost: float = 0.0
    drafts: list[int] = field(default_factory=list)  # proposed, not scheduled yet
    drafts_for: int = -1  # the request's num_tokens when they were proposed
    in_flight: list[int] = field(default_factory=list)  # scheduled, waiting for verification
    # Decayed sums over verification steps of drafts accepted and of rejections (0 or 1 a step):
    # their ratio estimates the per-token acceptance (accepted / (accepted + rejected)); `recent_`
    # with ACCEPTANCE_DECAY for k, `gate_` with GATE_ACCEPTANCE_DECAY for the step gate.
    recent_accepted: float = 1.0
    recent_rejected: float = 0.0
    gate_accepted: float = 1.0
    gate_rejected: float = 0.0
    proposer_state: Any = None  # the proposer's own per-request data (ngram: a token buffer)
    # rejection_sampling: the draft's distribution q at each of `drafts` ([k, V] float32 on the
    # device, set by the proposer), read when the drafts are verified and dropped after
    draft_probs: Any = None
    # Acceptance: verification steps that carried drafts, drafts checked, drafts accepted, and
    # drafts accepted at each position (index j: the j-th draft of a step).
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.accepted_per_pos = [0] * self.num_speculative_tokens

    @property
    def recent_acceptance(self) -> float:
        """Estimated probability that a draft is accepted given the ones before it. Every draft
        checked is a trial that ends at the first rejection, so accepted / (accepted +
        rejections) is the estimate whatever k each step had (a step that accepted all its
        drafts had no rejection); accepted / drafted would make a step with fewer drafts look
        better."""
        return self.recent_accepted / (self.recent_accepted + self.recent_rejected)

    @property
    def gate_acceptance(self) -> float:
        """The same estimate over a longer memory (the step gate's)."""
        return self.gate_accepted / (self.gate_accepted + self.gate_rejected)

    def num_drafts_wanted(self) -> int:
        """How many drafts to ask the proposer for next (1..num_speculative_tokens)."""
        if self.draft_token_cost == 0:
            return self.num_speculative_tokens
        return choose_num_drafts(
            self.recent_acceptance, self.num_speculative_tokens, self.draft_token_cost
        )

    @property
    def untried(self) -> bool:
        """Nothing proposed for it yet: its estimates are the optimistic start."""
        return self.drafts_for < 0

    def expected_gain(self, k: int) -> float:
        """Extra tokens a verification step with k drafts is expected to emit for this request
        (beyond the one any step emits), at the gate's estimate."""
        return expected_tokens(self.gate_acceptance, k) - 1

    def set_drafts(self, drafts: list[int], num_tokens: int) -> None:
        self.drafts = drafts
        self.drafts_for = num_tokens
        if not drafts:  # the proposer found nothing: for the estimates, a first draft rejected
            self.draft_probs = None
            self._record(accepted=0, rejected=True)

    def take_drafts(self, num_tokens: int) -> list[int]:
        """The drafts proposed for a request of `num_tokens` tokens (none if it has changed since),
        handed over once."""
        drafts = self.drafts if self.drafts_for == num_tokens else []
        self.drafts = []
        return drafts

    def on_verified(self, num_drafts: int, accepted: int) -> None:
        """A step's results: `num_drafts` drafts were checked (0: an ordinary decode step) and
        the first `accepted` of them kept."""
        self.draft_probs = None
        if num_drafts == 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += accepted
        for j in range(accepted):
            self.accepted_per_pos[j] += 1
        self._record(accepted, rejected=accepted < num_drafts)

    def _record(self, accepted: int, rejected: bool) -> None:
        self.recent_accepted = ACCEPTANCE_DECAY * self.recent_accepted + accepted
        self.recent_rejected = ACCEPTANCE_DECAY * self.recent_rejected + rejected
        self.gate_accepted = GATE_ACCEPTANCE_DECAY * self.gate_accepted + accepted
        self.gate_rejected = GATE_ACCEPTANCE_DECAY * self.gate_rejected + rejected


def step_cost(num_running: int, max_drafts: int, draft_token_cost: float) -> float:
    """What a verifying step costs a batch, in tokens of a decode step: every running request
    pays VERIFY_STEP_COST, and the drafts' price once per draft of the longest proposal (a draft
    model drafts the batch together, one step per draft; verifying n-gram drafts costs less
    than that at the batch sizes that speculate, and their price is small)."""
    return num_running * (VERIFY_STEP_COST + draft_token_cost * max_drafts)


@dataclass
class StepGate:
    """Whether the next step carries drafts (one per engine). A verifying step costs every
    running request more (`step_cost`), while only the requests with drafts gain: it pays when
    their expected extra tokens exceed that cost. When they do not, no request proposes for
    `pause` steps (doubling each time the gate closes again without having opened, up to
    BACKOFF_MAX); the step after a pause is a probe, proposed whatever the estimates, so that
    they can recover. A request with nothing proposed for it yet (its estimates are the
    optimistic start) ends a pause."""

    pause: int = 0  # steps left without proposals
    next_pause: int = BACKOFF_START
    probe: bool = False  # the next proposal step proposes regardless (after a pause)

    @property
    def open(self) -> bool:
        return self.pause == 0

    def tick(self, new_request: bool) -> None:
        """One step's results arrived while paused."""
        if self.pause == 0:
            return
        self.pause = 0 if new_request else self.pause - 1
        if self.pause == 0:
            self.probe = True

    def decide(self, gain: float, cost: float) -> bool:
        """Whether this proposal step proposes: its candidates' summed expected extra tokens
        against what verifying costs the batch, in tokens (`step_cost`)."""
        if gain >= cost:
            self.next_pause = BACKOFF_START
            self.probe = False
            return True
        if self.probe:
            self.probe = False
            return True
        self.pause = self.next_pause
        self.next_pause = min(2 * self.next_pause, BACKOFF_MAX)
        return False
