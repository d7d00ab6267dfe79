"""The `draft_model` proposer: a second, smaller model with the target's vocabulary guesses each
speculating request's next k tokens by running k decode steps of its own
(docs/speculative_decoding.md, "Draft model").

The draft is the target runner's `draft` (`ModelRunner`: loaded by our loader, compiled by our
compiler, its own CUDA graphs). Its KV cache has as many blocks as the target's and is addressed
by the target's block tables, so it needs no allocator of its own: a request's draft KV lives in
the slots of the request's own blocks. Before drafting, a request's blocks are extended to cover
the draft positions (`KVCacheManager.allocate_slots(..., cache_prefix=False)`: the blocks the
verification step will need anyway; none is entered in the prefix index before the target fills
it). Rejected drafts need no rollback: the target's `trim` frees the blocks past the verified
tokens, and a draft slot is only ever read after this request's draft wrote it for the token now
at that position (`_DraftKV.valid` tracks how far that holds).

Drafts are sampled with the request's own sampling parameters (docs, "Verification"). Under
`acceptance_method` "rejection_sampling" (the default) they draw from their own noise stream
(DRAFT_STREAM of the counter-based noise, at the output index they stand at) and the
distribution q each was drawn from is kept on the device (`SpecDecodeState.draft_probs`, a
[k, V] float32 row per draft) for the target's rejection sampler. Under "coupled" they draw with
the noise the target verifies with, and the target keeps a draft iff its own sample equals it,
so the emitted tokens are the ones it would emit without speculation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from compiled_llm.engine.model_runner import ModelRunner
from compiled_llm.kv_cache.kv_cache_manager import KVCacheManager
from compiled_llm.request import Request
from compiled_llm.sampling.batch import build_sampling_batch
from compiled_llm.sampling.sampler import DRAFT_STREAM, Sampler, SamplingBatch


@dataclass
class _DraftKV:
    """What of a request the draft's KV cache holds (Request.spec.proposer_state)."""

    valid: int = 0  # its first `valid` tokens have draft KV written for them
    num_preemptions: int = 0  # the request's count when `valid` was set (a preemption clears)
    # The last proposal: its drafts whose KV was written, from token position `start` on.
    start: int = 0
    written: list[int] = field(default_factory=list)

    def sync(self, request: Request) -> int:
        """`valid` now: drafts the request has since emitted as its own tokens keep their KV, up
        to (not including) its newest token, which is always fed again: its slot may have been
        freed with rejected drafts' blocks."""
        if request.num_preemptions != self.num_preemptions:
            self.num_preemptions = request.num_preemptions
            self.valid, self.written = 0, []
        if self.written:
            tokens = request.token_ids(self.start, self.start + len(self.written))
            same = 0
            for a, b in zip(tokens, self.written):
                if a != b:
                    break
                same += 1
            self.valid = self.start + same
            self.written = []
        self.valid = min(self.valid, request.num_tokens - 1)
        return self.valid


@dataclass
class _Proposal:
    """The requests one proposal drafts for, those with the most room first."""

    chosen: list[int]  # their indexes in the proposer's request list
    reqs: list[Request]
    room: list[int]  # drafts each may get
    kv: list[Any]  # their proposer_state
    valid: list[int]  # positions whose draft KV is valid, after catching up
    ends: list[int]  # where the context each feeds ends
    block_table: np.ndarray


class DraftModelProposer:
    """Runs the draft model for the requests the speculative decoder picked (spec_decode's
    `Proposer` protocol)."""

    def __init__(
        self, draft: ModelRunner, kv_cache: KVCacheManager, rejection_sampling: bool = True
    ) -> None:
        """`rejection_sampling`: speculative_config.acceptance_method is "rejection_sampling"
        (else "coupled")."""
        self.draft = draft
        self.kv_cache = kv_cache
        self.rejection_sampling = rejection_sampling
        self.vocab_size = draft.vocab_size
        self.max_tokens_per_forward = draft.config.scheduler_config.max_num_batched_tokens
        self.sampler = Sampler()
        self._batches: dict[int, SamplingBatch] = {}  # one proposal's, by number of rows
        self._q: list[torch.Tensor] = []  # one proposal's q rows, by draft step

    @torch.inference_mode()
    def propose(self, requests: list[Request], max_drafts: list[int]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in requests]
        with self.draft.profiler.stage("draft model"):
            p = self._start(requests, max_drafts)
            if p is not None:
                for i, drafts in zip(p.chosen, self._draft(p), strict=True):
                    out[i] = drafts
        return out

    # What an EAGLE-3 head does differently (engine/eagle_proposer.py): its per-request state,
    # the KV slots a proposal of k drafts needs, where the context it catches up on ends, which
    # token each position is fed (the head at position t reads token t + 1), and
    # `_before_chunk`.
    token_shift: ClassVar[int] = 0

    def _new_state(self, request: Request) -> Any:
        return _DraftKV(num_preemptions=request.num_preemptions)

    def _slots_needed(self, k: int) -> int:
        return k  # the newest token and drafts 1..k-1 (draft k is never fed)

    def _context_end(self, request: Request) -> int:
        return request.num_tokens  # N: draft 1 is the token at position N

    def _start(self, requests: list[Request], max_drafts: list[int]) -> _Proposal | None:
        """The requests that can draft, caught up: decoding (every token but the newest
        computed by the target) and with slots for their draft positions (else no drafts:
        drafting never preempts); None if there are none."""
        chosen: list[int] = []
        for i, (r, k) in enumerate(zip(requests, max_drafts)):
            state = r.spec
            assert state is not None
            if state.proposer_state is None:
                state.proposer_state = self._new_state(r)
            if k < 1 or r.num_computed_tokens != r.num_tokens - 1:
                continue
            if self.kv_cache.allocate_slots(r, self._slots_needed(k), cache_prefix=False):
                chosen.append(i)
        if not chosen:
            return None
        chosen.sort(key=lambda i: -max_drafts[i])  # the requests of step j form a prefix
        reqs = [requests[i] for i in chosen]
        kv = [r.spec.proposer_state for r in reqs]  # type: ignore[union-attr]
        valid = [s.sync(r) for s, r in zip(kv, reqs)]
        ends = [self._context_end(r) for r in reqs]
        block_ids = [self.kv_cache.block_ids(r) for r in reqs]
        block_table = np.zeros((len(reqs), max(len(b) for b in block_ids)), dtype=np.int32)
        for i, row in enumerate(block_ids):
            block_table[i, : len(row)] = row
        # Catch up (a new or preempted request's whole context, or tokens accepted last step
        # that the draft has not fed): chunks of at most max_num_batched_tokens until what is
        # left fits the first draft step (or is only the newest tokens).
        while sum(e - v for e, v in zip(ends, valid)) > self.max_tokens_per_forward and any(
            e - 1 > v for e, v in zip(ends, valid)
        ):
            self._prefill_chunk(reqs, valid, ends, block_table)
        room = [max_drafts[i] for i in chosen]
        return _Proposal(chosen, reqs, room, kv, valid, ends, block_table)

    @staticmethod
    def _by_request(sampled: list[torch.Tensor], room: list[int]) -> list[list[int]]:
        """Each request's drafts from the draft steps' draws (step j's rows are the requests
        with room for draft j + 1), in one host copy."""
        flat: list[int] = torch.cat(sampled).tolist()
        offset = 0
        drafts: list[list[int]] = [[] for _ in room]
        for j in range(max(room)):
            n = sum(1 for k in room if k > j)
            for i in range(n):
                drafts[i].append(flat[offset + i])
            offset += n
        return drafts

    def _draft(self, p: _Proposal) -> list[list[int]]:
        """The drafts of `p`'s requests, in its order."""
        reqs, room, valid, ends, block_table = p.reqs, p.room, p.valid, p.ends, p.block_table

        # Draft step 1 feeds each request's tokens from `valid` to its newest; step j > 1 feeds
        # draft j - 1 (still on the device) at position N + j - 2, for the requests with room
        # for draft j. One host copy at the end.
        q_lens = np.array([e - v for e, v in zip(ends, valid)], dtype=np.int64)
        tokens = np.concatenate(
            [np.asarray(r.token_ids(v, e), dtype=np.int64) for r, v, e in zip(reqs, valid, ends)]
        )
        seq_lens = np.array(ends, dtype=np.int64)
        sampled: list[torch.Tensor] = []
        prev: torch.Tensor | None = None
        for j in range(max(room)):
            n = sum(1 for k in room if k > j)
            if j > 0:
                assert prev is not None
                tokens = np.zeros(n, dtype=np.int64)
                q_lens = np.ones(n, dtype=np.int64)
                seq_lens = np.array(ends[:n], dtype=np.int64) + j
            ids, positions, attn = self.draft._device_inputs(
                tokens, q_lens, seq_lens, block_table[:n]
            )
            if prev is not None:
                ids[:n] = prev[:n]
            hidden = self.draft.run_model(ids, positions, attn)
            logits = self.draft.compute_logits(hidden[self._last_rows(q_lens)])
            prev = self._draw(logits, reqs[:n], j)
            sampled.append(prev)
        self._keep_q(reqs, room)
        drafts = self._by_request(sampled, room)
        for i, (written, e) in enumerate(zip(p.kv, ends)):
            written.valid, written.start = e, e
            written.written = drafts[i][: room[i] - 1]  # drafts 1..k-1 were fed
        return drafts

    def _draw(self, logits: torch.Tensor, reqs: list[Request], j: int) -> torch.Tensor:
        """Draft j + 1 of each request (on the device); under rejection_sampling q's rows are
        kept for `_keep_q` (not for a batch of greedy requests only: they accept on argmax
        match)."""
        batch = self._batch(reqs, j)
        if not self.rejection_sampling or batch.all_greedy:
            return self.sampler(logits, batch).token_ids
        out, q = self.sampler.sample_with_probs(logits, batch)
        self._q.append(q)
        return out.token_ids

    def _keep_q(self, reqs: list[Request], room: list[int]) -> None:
        """Hand each request its drafts' q rows (`spec.draft_probs`): one [requests, k, V]
        buffer, each request a view of its rows. Its memory, 4 bytes x V per draft (k = 4 and
        a 128k vocabulary: 2 MiB per request), lives until the drafts are verified."""
        self._batches.clear()
        if not self._q:
            for r in reqs:
                assert r.spec is not None
                r.spec.draft_probs = None
            return
        q = torch.zeros(
            (len(reqs), max(room), self._q[0].shape[1]),
            dtype=torch.float32,
            device=self._q[0].device,
        )
        for j, rows in enumerate(self._q):
            q[: rows.shape[0], j] = rows
        self._q = []
        for i, r in enumerate(reqs):
            assert r.spec is not None
            r.spec.draft_probs = q[i, : room[i]]

    def _batch(self, reqs: list[Request], j: int) -> SamplingBatch:
        """Sampling rows for draft j + 1 of each request: its own parameters, at its output
        index (no token is pending while drafting, so the builder's index is one short), with
        every random row on the counter-based noise: the verification step's under "coupled",
        its own stream under "rejection_sampling". Penalties
        and min_tokens see the request's output without the drafts before: only acceptance
        depends on that."""
        batch = self._batches.get(len(reqs))
        if batch is None:
            batch = build_sampling_batch(
                reqs, self.vocab_size, self.draft.device, drafts=[[] for _ in reqs]
            )
            stream = DRAFT_STREAM if self.rejection_sampling else 0
            batch = dataclasses.replace(batch, max_num_logprobs=-1, noise_stream=stream)
            self._batches[len(reqs)] = batch
        return dataclasses.replace(batch, steps=batch.steps + 1 + j)

    def _last_rows(self, q_lens: np.ndarray) -> torch.Tensor:
        return self.draft._to_device(np.cumsum(q_lens) - 1)

    def _prefill_chunk(
        self,
        reqs: list[Request],
        valid: list[int],
        ends: list[int],
        block_table: np.ndarray,
    ) -> None:
        """One draft forward that writes KV for up to max_num_batched_tokens of the requests'
        catch-up positions (never the last before `ends`, which the first draft step feeds).
        Position t is fed token t + `token_shift`, after `_before_chunk`."""
        budget = self.max_tokens_per_forward
        rows, starts, stops = [], [], []
        for i, (v, e) in enumerate(zip(valid, ends)):
            take = min(e - 1 - v, budget)
            if take <= 0:
                continue
            rows.append(i)
            starts.append(v)
            stops.append(v + take)
            valid[i] = v + take
            budget -= take
            if budget == 0:
                break
        self._before_chunk(block_table, rows, starts, stops)
        shift = self.token_shift
        pieces = [
            np.asarray(reqs[i].token_ids(a + shift, b + shift), dtype=np.int64)
            for i, a, b in zip(rows, starts, stops)
        ]
        ids, positions, attn = self.draft._device_inputs(
            np.concatenate(pieces),
            np.array([b - a for a, b in zip(starts, stops)], dtype=np.int64),
            np.array(stops, dtype=np.int64),
            block_table[rows],
        )
        self.draft.run_model(ids, positions, attn)

    def _before_chunk(
        self, block_table: np.ndarray, rows: list[int], starts: list[int], stops: list[int]
    ) -> None:
        """What a catch-up forward reads besides the tokens (an EAGLE-3 head: the target's
        states); a draft model reads nothing else."""


def draft_proposer(runner: ModelRunner, kv_cache: KVCacheManager) -> DraftModelProposer | None:
    """The proposer of a runner with a draft model (speculative_config.method draft_model) or an
    EAGLE-3 head (eagle3)."""
    if runner.draft is None:
        return None
    if runner.aux_hidden is not None:
        from compiled_llm.engine.eagle_proposer import Eagle3Proposer

        return Eagle3Proposer(runner, kv_cache)
    spec = runner.config.speculative_config
    rejection = spec is not None and spec.acceptance_method == "rejection_sampling"
    return DraftModelProposer(runner.draft, kv_cache, rejection)
