"""The `eagle3` proposer: an EAGLE-3 head (models/llama_eagle3.py) guesses each speculating
request's next k tokens from the target's own hidden states (docs/speculative_decoding.md,
"EAGLE-3").

It is the draft-model proposer with a different input: the head at position t reads the token
at t + 1 and the target's hidden states at t (three layers' inputs, combined by the head's `fc`),
so it runs one position behind the target. Every target step writes that combined state at
each token's KV slot (`ModelRunner.hidden_cache`); the head reads it from there when it catches
up, so the target's steps that drafted nothing (prefill chunks, backed-off decodes) leave what
it needs. Draft step 1 feeds each request's positions from where the head's KV is valid up to
N - 2 (N tokens: the newest, N - 1, is the target's next input), ending with the newest token,
and samples draft 1; step j > 1 feeds draft j - 1 at position N + j - 3 with the head's own
output at the previous position as its hidden state. Positions fed that way have KV computed
from the head's guesses, not the target's states, so they are never counted valid: the next
proposal feeds them again with the target's (what vLLM's EAGLE proposer does).

Everything else is the draft model's: one KV cache addressed by the target's block tables, the
request's own sampling parameters (and, under rejection_sampling, q kept for the target),
drafts kept on the device until one copy at the end, the same verification.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from compiled_llm.engine.draft_proposer import DraftModelProposer, _Proposal
from compiled_llm.engine.model_runner import ModelRunner
from compiled_llm.kv_cache.kv_cache_manager import KVCacheManager
from compiled_llm.request import Request


@dataclass
class _HeadKV:
    """What of a request the head's KV cache holds (Request.spec.proposer_state)."""

    valid: int = 0  # positions 0..valid-1 hold KV computed from the target's hidden states
    num_preemptions: int = 0  # the request's count when `valid` was set (a preemption clears)

    def sync(self, request: Request) -> int:
        if request.num_preemptions != self.num_preemptions:
            self.num_preemptions, self.valid = request.num_preemptions, 0
        self.valid = min(self.valid, request.num_tokens - 2)
        return self.valid


class Eagle3Proposer(DraftModelProposer):
    def __init__(self, target: ModelRunner, kv_cache: KVCacheManager) -> None:
        assert target.draft is not None
        spec = target.config.speculative_config
        rejection = spec is not None and spec.acceptance_method == "rejection_sampling"
        super().__init__(target.draft, kv_cache, rejection)
        self.target = target
        self.block_size = target.block_size

    @property
    def hidden_cache(self) -> torch.Tensor:
        """The target's combined states per KV slot (allocated with the KV cache)."""
        assert self.target.hidden_cache is not None
        return self.target.hidden_cache

    @property
    def hidden_in(self) -> torch.Tensor:
        """The head's hidden-state input (models/llama_eagle3.py)."""
        buf: torch.Tensor = self.draft.model.hidden_in  # type: ignore[assignment]
        return buf

    token_shift: ClassVar[int] = 1  # the head at position t reads token t + 1

    def _new_state(self, request: Request) -> Any:
        return _HeadKV(num_preemptions=request.num_preemptions)

    def _slots_needed(self, k: int) -> int:
        return k - 1  # up to position N + k - 3, the last draft step's

    def _context_end(self, request: Request) -> int:
        return request.num_tokens - 1  # positions valid..N-2 have the target's states

    def _draft(self, p: _Proposal) -> list[list[int]]:
        reqs, room, valid, ends, block_table = p.reqs, p.room, p.valid, p.ends, p.block_table

        # Step 1: positions valid..N-2 with the target's states; step j > 1: draft j - 1 at
        # position N + j - 3 with the head's own output at the position before.
        rows = list(range(len(reqs)))
        q_lens = np.array([e - v for e, v in zip(ends, valid)], dtype=np.int64)
        tokens = np.concatenate(
            [
                np.asarray(r.token_ids(v + 1, e + 1), dtype=np.int64)
                for r, v, e in zip(reqs, valid, ends)
            ]
        )
        self._fill_from_target(block_table, rows, valid, ends)
        sampled: list[torch.Tensor] = []
        prev: torch.Tensor | None = None
        for j in range(max(room)):
            n = sum(1 for k in room if k > j)
            seq_lens = np.array(ends[:n], dtype=np.int64) + j
            if j > 0:
                tokens = np.zeros(n, dtype=np.int64)
                q_lens = np.ones(n, dtype=np.int64)
            ids, positions, attn = self.draft._device_inputs(
                tokens, q_lens, seq_lens, block_table[:n]
            )
            if prev is not None:
                ids[:n] = prev[:n]
            hidden = self.draft.run_model(ids, positions, attn)
            last = hidden[self._last_rows(q_lens)]
            logits = self.draft.compute_logits(last)
            prev = self._draw(logits, reqs[:n], j)
            sampled.append(prev)
            if j + 1 < max(room):
                self.hidden_in[: last.shape[0]].copy_(last)
        self._keep_q(reqs, room)
        drafts = self._by_request(sampled, room)
        for head_kv, e in zip(p.kv, ends, strict=True):
            head_kv.valid = e
        return drafts

    def _before_chunk(
        self, block_table: np.ndarray, rows: list[int], starts: list[int], stops: list[int]
    ) -> None:
        self._fill_from_target(block_table, rows, starts, stops)

    def _fill_from_target(
        self, block_table: np.ndarray, rows: list[int], starts: list[int], ends: list[int]
    ) -> None:
        """`hidden_in` = the target's combined states at positions starts[i]..ends[i]-1 of each
        request rows[i], in order, read from their KV slots."""
        pieces = []
        for row, start, end in zip(rows, starts, ends):
            pos = np.arange(start, end, dtype=np.int64)
            pieces.append(block_table[row, pos // self.block_size] * self.block_size)
            pieces[-1] = pieces[-1].astype(np.int64) + pos % self.block_size
        slots = self.draft._to_device(np.concatenate(pieces))
        self.hidden_in[: len(slots)] = self.hidden_cache[slots]
