"""Continuous batching under one token budget.

Each request's `num_computed_tokens` catches up with its token count; a step gives every running
request its next chunk (1 token when decoding) and then admits waiting requests while budget,
sequence slots and KV blocks last. That one rule covers chunked prefill, prefix-cache hits and
decode alike. When blocks run out, the lowest-priority (then newest) running request is
preempted: its blocks are freed and it recomputes later, with the tokens it had already produced.

Speculative decoding (docs/speculative_decoding.md): a decoding request with drafts is scheduled
for 1 + len(drafts) tokens, its KV slots allocated for all of them. Its progress counts the
first only; when the step's tokens arrive, the accepted drafts are added, the rejected ones'
slots rolled back (blocks past the verified tokens freed) and the emitted tokens appended one by
one, each checked for a stop. Prefix-cache hashes only ever cover verified tokens, since drafts
are not part of a request's tokens.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from compiled_llm.config import SchedulerConfig, SpeculativeConfig
from compiled_llm.kv_cache.kv_cache_manager import KVCacheManager
from compiled_llm.request import Request, RequestStatus
from compiled_llm.spec_decode.state import num_accepted

if TYPE_CHECKING:
    from compiled_llm.structured_output.manager import RequestGrammar


@dataclass
class ScheduledRequest:
    request: Request
    num_tokens: int  # tokens fed this step
    start: int  # index of the first of them in the request's token sequence
    samples: bool  # this step ends at the request's newest token, so it samples the next one
    # Speculative decoding: draft tokens fed after the newest one (counted in num_tokens); the
    # step samples at each of them too.
    draft_token_ids: list[int] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def total_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class RequestUpdate:
    """What one step's results did to a request."""

    request: Request
    num_new_tokens: int  # tokens appended (a stop can cut the accepted ones short)
    num_draft_tokens: int = 0  # drafts verified
    num_accepted_tokens: int = 0  # of them, accepted


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_free_blocks: int
    prefix_cache_hit_rate: float
    num_preemptions: int


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv_cache: KVCacheManager,
        speculative: SpeculativeConfig | None = None,
    ) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.speculative = speculative
        self.running: list[Request] = []
        self._waiting: list[tuple[int, float, int, Request]] = []  # heap by priority, arrival
        self._counter = itertools.count()
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        # Requests that ended outside a step's results (a grammar that failed to compile, or
        # whose matcher refused a token); the core reports them and clears the list.
        self.finished_unscheduled: list[Request] = []
        # Grammars the last schedule found still compiling (their requests wait).
        self.compiling: list[RequestGrammar] = []

    # --- queue ----------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self._push_waiting(request)

    def _push_waiting(self, request: Request) -> None:
        key = (request.priority, request.arrival_time, next(self._counter), request)
        heapq.heappush(self._waiting, key)

    @property
    def num_waiting(self) -> int:
        return sum(1 for *_, r in self._waiting if not r.is_finished)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def finish(self, request_id: str, status: RequestStatus) -> Request | None:
        """End a request (abort, stop string, ...) and free its blocks at once."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        request.status = status
        if request in self.running:
            self.running.remove(request)
        self.kv_cache.forget(request)
        if request.grammar is not None:
            request.grammar.release()
        return request  # a finished request left in the waiting heap is skipped when popped

    # --- one step -------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        self.running.sort(key=lambda r: (r.priority, r.arrival_time))
        speculating = self.speculating(len(self.running))
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens_with_pending - request.num_computed_tokens, budget)
            out_with_pending = request.num_tokens_with_pending - request.num_prompt_tokens
            if (
                num_new <= 0
                or out_with_pending >= request.max_tokens
                or (request.spec is not None and request.spec.in_flight)
            ):
                # waits for a token still being sampled, or its last token is (async
                # scheduling), or for the verification of its drafts
                i += 1
                continue
            drafts = self._drafts(request, budget, speculating)
            if drafts and self.kv_cache.allocate_slots(request, num_new + len(drafts)):
                out.scheduled.append(self._schedule(request, num_new, drafts))
                budget -= num_new + len(drafts)
                i += 1
                continue
            # no drafts, or no blocks for them: an ordinary step (drafts never preempt)
            while not self.kv_cache.allocate_slots(request, num_new):
                victim = self.running[-1]  # lowest priority, newest arrival
                self._preempt(victim)
                out.num_preempted += 1
                if victim is request:
                    break
            else:
                out.scheduled.append(self._schedule(request, num_new))
                budget -= num_new
                i += 1
        if out.num_preempted:
            return self._commit(out)
        not_ready = []  # requests whose grammar is still compiling: they keep their place
        verifying = []  # preempted while their drafts are verified: they wait for the results
        while self._waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self._waiting[0][-1]
            if request.is_finished:
                heapq.heappop(self._waiting)
                continue
            if request.spec is not None and request.spec.in_flight:
                verifying.append(heapq.heappop(self._waiting))
                continue
            grammar = request.grammar
            if grammar is not None and not grammar.ready():
                not_ready.append(heapq.heappop(self._waiting))
                continue
            if grammar is not None and grammar.error is not None:
                heapq.heappop(self._waiting)
                request.stop_reason = grammar.error
                self.finish(request.request_id, RequestStatus.FINISHED_ERROR)
                self.finished_unscheduled.append(request)
                continue
            computed, num_cached = self.kv_cache.get_computed_blocks(request)
            num_new = request.num_tokens - num_cached
            if num_new > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            if not self.kv_cache.allocate_slots(request, num_new, computed):
                break
            heapq.heappop(self._waiting)
            request.num_computed_tokens = num_cached
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(self._schedule(request, num_new))
            budget -= num_new
        for key in not_ready + verifying:
            heapq.heappush(self._waiting, key)
        self.compiling = [key[-1].grammar for key in not_ready]  # type: ignore[misc]
        return self._commit(out)

    def speculating(self, num_running: int) -> bool:
        """Whether requests may speculate in a step that starts with this many running
        (speculative_config.disable_by_batch_size)."""
        spec = self.speculative
        if spec is None:
            return False
        return spec.disable_by_batch_size is None or num_running <= spec.disable_by_batch_size

    def _drafts(self, request: Request, budget: int, speculating: bool) -> list[int]:
        """The drafts this step verifies for a running request: those proposed for its current
        tokens, if it is decoding (just its newest token to feed, none in flight), cut to the
        token budget and to max_tokens (the step emits up to drafts + 1 tokens)."""
        state = request.spec
        if state is None:
            return []
        drafts = state.take_drafts(request.num_tokens)
        decoding = (
            request.num_pending_output_tokens == 0
            and request.num_computed_tokens == request.num_tokens - 1
        )
        if not drafts or not speculating or not decoding:
            return []
        room = min(budget - 1, request.max_tokens - len(request.output_token_ids) - 1)
        return drafts[: max(room, 0)]

    def _schedule(
        self, request: Request, num_new: int, drafts: list[int] | None = None
    ) -> ScheduledRequest:
        start = request.num_computed_tokens
        samples = start + num_new == request.num_tokens_with_pending
        drafts = drafts or []
        return ScheduledRequest(request, num_new + len(drafts), start, samples, drafts)

    def _commit(self, out: SchedulerOutput) -> SchedulerOutput:
        """Advance progress as if the step had run: the next schedule may overlap with it.
        Drafts are not counted until verified."""
        for s in out.scheduled:
            s.request.num_computed_tokens += s.num_tokens - len(s.draft_token_ids)
            if s.samples:
                s.request.num_pending_output_tokens += 1
            if s.draft_token_ids:
                assert s.request.spec is not None
                s.request.spec.in_flight = s.draft_token_ids
        return out

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv_cache.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._push_waiting(request)

    # --- results --------------------------------------------------------------------------------
    def update_from_output(self, sampled: dict[str, list[int]]) -> list[RequestUpdate]:
        """Take each request's sampled tokens (one per row: 1 + its drafts): keep the drafts
        the target sampled too and the token after them, appending tokens one at a time and
        finishing the request at the first that stops it (the rest are dropped). Returns every
        request that got tokens (finished ones included)."""
        updated = []
        for request_id, tokens in sampled.items():
            request = self.requests.get(request_id)
            if request is None:  # finished while this step was in flight
                continue
            request.num_pending_output_tokens -= 1
            drafts: list[int] = []
            if request.spec is not None:
                drafts, request.spec.in_flight = request.spec.in_flight, []
            accepted = num_accepted(drafts, tokens)
            if drafts and request.status is RequestStatus.RUNNING:
                # the accepted drafts' KV is now the request's; the rejected ones' slots are
                # given back (a preempted request recomputes everything anyway)
                request.num_computed_tokens += accepted
                self.kv_cache.trim(request)
            num_new = 0
            for token in tokens[: accepted + 1]:
                request.output_token_ids.append(token)
                num_new += 1
                status = self._check_grammar(request, token) or self._check_stop(request, token)
                if status is not None:
                    self.finish(request_id, status)
                    break
            if request.spec is not None:
                request.spec.on_verified(len(drafts), accepted)
            updated.append(RequestUpdate(request, num_new, len(drafts), accepted))
        return updated

    @staticmethod
    def _check_grammar(request: Request, token: int) -> RequestStatus | None:
        """Advance the request's matcher: its end state stops the request (finish_reason
        "stop", also under ignore_eos), a token it refuses ends it with "error"."""
        grammar = request.grammar
        if grammar is None:
            return None
        if not grammar.accept(token):
            request.stop_reason = grammar.error
            return RequestStatus.FINISHED_ERROR
        if grammar.is_terminated():
            if token in request.sampling_params.stop_token_ids:  # type: ignore[operator]
                request.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        return None

    @staticmethod
    def _check_stop(request: Request, token: int) -> RequestStatus | None:
        params = request.sampling_params
        num_out = len(request.output_token_ids)
        if num_out >= params.min_tokens:
            if token in params.stop_token_ids:  # type: ignore[operator]
                request.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
            if not params.ignore_eos and token in params.all_stop_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if num_out >= request.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=self.num_waiting,
            kv_cache_usage=self.kv_cache.usage(),
            num_free_blocks=self.kv_cache.num_free_blocks,
            prefix_cache_hit_rate=self.kv_cache.prefix_cache_hit_rate(),
            num_preemptions=self.num_preemptions,
        )
