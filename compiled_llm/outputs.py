"""What `LLM.generate` returns, with vLLM's class and field names."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per generated token: token id -> Logprob (the sampled token and the top ones).
SampleLogprobs = list[dict[int, Logprob]]
# One per prompt token (None for the first, which nothing predicts): the token and the top ones.
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class SpecDecodeMetrics:
    """A request's speculative decoding (summed over its samples when n > 1)."""

    num_spec_steps: int = 0  # steps that verified drafts
    num_draft_tokens: int = 0  # drafts verified
    num_accepted_draft_tokens: int = 0  # of them, accepted

    @property
    def draft_acceptance_rate(self) -> float:
        return (
            self.num_accepted_draft_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0
        )

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verification step: the accepted drafts plus the one the target
        sampled after them (1.0 .. k + 1)."""
        if not self.num_spec_steps:
            return 0.0
        return 1.0 + self.num_accepted_draft_tokens / self.num_spec_steps


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0
    spec_decode: SpecDecodeMetrics | None = None  # None: no drafts were verified for it


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = field(default=None, repr=False)
    prompt_logprobs: PromptLogprobs | None = None


@dataclass
class BeamSearchSequence:
    """One sequence of `LLM.beam_search` (vLLM's): `tokens` and `text` include the prompt, as in
    vLLM; `logprobs` has one entry per generated token (the candidates it was chosen among)."""

    tokens: list[int]
    logprobs: SampleLogprobs
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None  # "stop" (EOS) or "length"


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # best first
