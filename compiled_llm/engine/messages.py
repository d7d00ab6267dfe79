"""What crosses between the frontend (tokenization, detokenization) and the engine core.

msgspec structs, so the same types serve the in-process engine and the ZeroMQ wire format.
"""

from __future__ import annotations

import msgspec

from compiled_llm.sampling_params import SamplingParams


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


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    outputs: list[EngineCoreOutput] = []
    stats: SchedulerStatsMsg | None = None
    timestamp: float = 0.0
