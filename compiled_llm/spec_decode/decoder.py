"""What the engine core asks of speculative decoding: a state for each new request, proposals
after each step's results, and whether the next step must wait for those results.

Proposals need a request's newest token on the host. Under async scheduling the engine
schedules step N+1 before step N's tokens are read, so while the step gate is open the core reads
the step in flight first (`wants_host_tokens`): the engine runs synchronously while requests
speculate, and asynchronously while the gate is closed (speculation does not pay) or the batch is
too large, which is when the overlap pays.
"""

from __future__ import annotations

from collections.abc import Iterable

from compiled_llm.config import SpeculativeConfig
from compiled_llm.request import Request, RequestStatus
from compiled_llm.spec_decode.proposer import Proposer, create_proposer
from compiled_llm.spec_decode.state import SpecDecodeState, StepGate, step_cost


class SpeculativeDecoder:
    def __init__(self, config: SpeculativeConfig, proposer: Proposer | None = None) -> None:
        """`proposer`: one the engine built (a draft model needs the engine's runner and KV
        cache); by default the registry's for `config.method`."""
        self.config = config
        self.proposer = proposer if proposer is not None else create_proposer(config)
        self.gate = StepGate()

    def new_state(self) -> SpecDecodeState:
        return SpecDecodeState(
            self.config.num_speculative_tokens, draft_token_cost=self.config.draft_token_cost
        )

    def enabled_for(self, num_running: int) -> bool:
        """Whether a step with this many running requests speculates."""
        limit = self.config.disable_by_batch_size
        return limit is None or num_running <= limit

    def wants_host_tokens(self, running: list[Request]) -> bool:
        """Some running request would propose (the gate is open) or has drafts being verified
        once the step in flight is read: read it before scheduling the next."""
        if not self.enabled_for(len(running)):
            return False
        return any(
            r.spec is not None
            and r.num_pending_output_tokens > 0
            and (self.gate.open or r.spec.in_flight)
            for r in running
        )

    def propose(self, requests: Iterable[Request], num_running: int) -> None:
        """Called once per step with the requests that just got tokens. Proposals go to those
        still running, with no token in flight and room for a draft before max_tokens, each asked
        for the number of drafts its recent acceptance makes worth it
        (SpecDecodeState.num_drafts_wanted), when the step gate finds that their expected extra
        tokens pay for a verifying step (StepGate). When no request is left running, the gate
        starts over: its estimates describe the batch that ran, and a fresh one keeps a seeded
        batch reproducible on an idle engine (under rejection sampling a draft changes the token
        drawn at its position, so which steps carry drafts must not depend on earlier batches)."""
        if num_running == 0:
            self.gate = StepGate()
            return
        if not self.enabled_for(num_running):
            return
        requests = list(requests)
        if not self.gate.open:
            self.gate.tick(any(r.spec is not None and r.spec.untried for r in requests))
            if not self.gate.open:
                return
        chosen: list[Request] = []
        room: list[int] = []
        for r in requests:
            state = r.spec
            if (
                state is None
                or r.status is not RequestStatus.RUNNING
                or r.num_pending_output_tokens
            ):
                continue
            # The step emits up to drafts + 1 tokens: keep them within max_tokens (which also
            # keeps them within max_model_len).
            left = r.max_tokens - len(r.output_token_ids) - 1
            if left > 0:
                chosen.append(r)
                room.append(min(state.num_drafts_wanted(), left))
        if not chosen:
            return
        gain = sum(r.spec.expected_gain(k) for r, k in zip(chosen, room) if r.spec is not None)
        cost = step_cost(num_running, max(room), self.config.draft_token_cost)
        if not self.gate.decide(gain, cost):
            return
        for r, k, drafts in zip(chosen, room, self.proposer.propose(chosen, room)):
            assert r.spec is not None
            r.spec.set_drafts(list(drafts[:k]), r.num_tokens)
