"""What crosses between the frontend (tokenization, detokenization) and the engine core.

msgspec structs, so the same types serve the in-process engine and the ZeroMQ wire format.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import msgspec

from compiled_llm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from compiled_llm.engine.scheduler import RequestUpdate


class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int  # resolved against max_model_len by the frontend
    sampling_seed: int
    arrival_time: float
    priority: int = 0


# Per sampled token with logprobs: (top ids, top logprobs, sampled logprob, sampled rank).
TokenLogprobs = tuple[list[int], list[float], float, int]


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    # Speculative decoding, this step: drafts verified and, of them, accepted.
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    # sampling_params.prompt_logprobs, once, with the request's first tokens: per prompt
    # position (None at the first).
    prompt_logprobs: list[TokenLogprobs | None] | None = None


class SpecDecodeStatsMsg(msgspec.Struct, array_like=True, gc=False):
    """Speculation counters over the step results read since the last report (vLLM's
    spec_decode metrics)."""

    num_drafts: int  # verification steps of a request that carried drafts
    num_draft_tokens: int
    num_accepted_tokens: int
    num_accepted_tokens_per_pos: list[int]  # index j: j-th drafts accepted

    @classmethod
    def empty(cls, num_speculative_tokens: int) -> SpecDecodeStatsMsg:
        return cls(0, 0, 0, [0] * num_speculative_tokens)

    def add(self, updates: Iterable[RequestUpdate]) -> None:
        """Count one step's results."""
        for u in updates:
            if u.num_draft_tokens:
                self.num_drafts += 1
                self.num_draft_tokens += u.num_draft_tokens
                self.num_accepted_tokens += u.num_accepted_tokens
                for j in range(u.num_accepted_tokens):
                    self.num_accepted_tokens_per_pos[j] += 1


class SchedulerStatsMsg(msgspec.Struct, array_like=True, gc=False):
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_hit_rate: float
    num_preemptions: int
    num_prompt_tokens_computed: int  # this step
    num_generation_tokens: int  # this step
    spec_decode: SpecDecodeStatsMsg | None = None  # None: no drafts verified
    num_scheduled_tokens: int = 0  # this step: every token computed (prompt, decode, drafts)


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    outputs: list[EngineCoreOutput] = []
    stats: SchedulerStatsMsg | None = None
    timestamp: float = 0.0
