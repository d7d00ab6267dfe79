"""What speculative decoding tracks per request: its drafts, its back-off, its acceptance."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Back-off: after this many consecutive proposal steps in which nothing was accepted (no draft
# found, or every draft rejected), a request stops proposing for a pause of decode steps. The
# pause starts at BACKOFF_START and doubles each time it is taken again without an accepted
# token in between, up to BACKOFF_MAX; one accepted token ends the back-off.
MISSES_BEFORE_BACKOFF = 3
BACKOFF_START = 8
BACKOFF_MAX = 64


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
    drafts: list[int] = field(default_factory=list)  # proposed, not scheduled yet
    drafts_for: int = -1  # the request's num_tokens when they were proposed
    in_flight: list[int] = field(default_factory=list)  # scheduled, waiting for verification
    misses: int = 0  # consecutive proposal steps with nothing accepted
    pause: int = 0  # decode steps left without proposing
    next_pause: int = BACKOFF_START
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
    def active(self) -> bool:
        """Proposing (not backed off)."""
        return self.pause == 0

    def set_drafts(self, drafts: list[int], num_tokens: int) -> None:
        self.drafts = drafts
        self.drafts_for = num_tokens
        if not drafts:
            self.draft_probs = None
            self._miss()

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
            self.pause = max(0, self.pause - 1)
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += accepted
        for j in range(accepted):
            self.accepted_per_pos[j] += 1
        if accepted:
            self.misses = 0
            self.next_pause = BACKOFF_START
        else:
            self._miss()

    def _miss(self) -> None:
        self.misses += 1
        if self.misses >= MISSES_BEFORE_BACKOFF:
            self.pause = self.next_pause
            self.next_pause = min(2 * self.next_pause, BACKOFF_MAX)
