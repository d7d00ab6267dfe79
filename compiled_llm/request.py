"""A request as the engine core tracks it: its tokens, progress and KV blocks."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from compiled_llm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from compiled_llm.engine.messages import TokenLogprobs
    from compiled_llm.spec_decode.state import SpecDecodeState
    from compiled_llm.structured_output.manager import RequestGrammar


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    # A grammar (structured outputs) that failed to compile or could not be continued; the
    # request's stop_reason says which.
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
            RequestStatus.FINISHED_ERROR,
        )


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int  # resolved: never past max_model_len
    sampling_seed: int  # the per-request seed the sampler's noise is derived from
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = -1  # prompt tokens served by the prefix cache at first schedule
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    # Placeholder tokens scheduled but not yet sampled (async scheduling): the core appends
    # them when step results arrive.
    num_pending_output_tokens: int = 0
    # Structured outputs: this sample's grammar and matcher (None: unconstrained).
    grammar: RequestGrammar | None = None
    # Speculative decoding: drafts and acceptance (None: speculation is off).
    spec: SpecDecodeState | None = None
    # sampling_params.prompt_logprobs: one entry per prompt position (the first stays None),
    # filled as the prompt's chunks run, sent with the first output (None: not asked for).
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    prompt_logprobs_sent: bool = False

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Its prompt must be computed, not read from the prefix cache: logprobs come from the
        logits of every prompt position (vLLM skips the cache for these requests too)."""
        return self.prompt_logprobs is not None and not self.prompt_logprobs_sent

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without building the whole list (the step loop asks for a
        few tokens of every running request, every step)."""
        prompt = self.prompt_token_ids
        if end <= len(prompt):
            return prompt[start:end]
        output = self.output_token_ids
        if start >= len(prompt):
            return output[start - len(prompt) : end - len(prompt)]
        return prompt[start:] + output[: end - len(prompt)]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens whose ids are known (prompt + sampled output)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_with_pending(self) -> int:
        return self.num_tokens + self.num_pending_output_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        if not self.status.finished:
            return None
        return self.status.value
