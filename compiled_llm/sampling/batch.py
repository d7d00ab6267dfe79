"""Build a step's `SamplingBatch` from the requests that sample in it."""

from __future__ import annotations

from typing import Protocol

import torch

from compiled_llm.request import Request
from compiled_llm.sampling.sampler import SamplingBatch


class InFlightStep(Protocol):
    """The step still running on the device (async scheduling): its sampled ids, by request."""

    device_tokens: torch.Tensor | None
    row: dict[str, int]


def _padded(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0) or 1
    out = torch.full((len(rows), width), pad, dtype=torch.int64)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
    return out.to(device, non_blocking=True)


def _output_ids(
    requests: list[Request],
    steps: list[int],
    vocab_size: int,
    device: torch.device,
    in_flight: InFlightStep | None,
) -> torch.Tensor:
    """Each row's output ids so far, padded with vocab_size. Under async scheduling the newest
    may still be on the device (sampled by `in_flight`): it is appended from there, so the
    penalties see it without waiting for the step."""
    ids = _padded([r.output_token_ids for r in requests], vocab_size, device)
    missing = [i for i, (r, n) in enumerate(zip(requests, steps)) if n > len(r.output_token_ids)]
    if not missing:
        return ids
    assert in_flight is not None and in_flight.device_tokens is not None
    assert all(steps[i] == len(requests[i].output_token_ids) + 1 for i in missing)
    src = [in_flight.row[requests[i].request_id] for i in missing]
    column = torch.full((len(requests),), vocab_size, dtype=torch.int64, device=device)
    column[_tensor(missing, torch.int64, device)] = in_flight.device_tokens[
        _tensor(src, torch.int64, device)
    ]
    return torch.cat([ids, column[:, None]], dim=1)


def _tensor(
    values: list[float] | list[int], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def build_sampling_batch(
    requests: list[Request],
    vocab_size: int,
    device: torch.device,
    in_flight: InFlightStep | None = None,
) -> SamplingBatch:
    params = [r.sampling_params for r in requests]
    # Index of the token each row samples in its request's output (scheduling already counted it
    # as pending).
    steps = [r.num_tokens_with_pending - r.num_prompt_tokens - 1 for r in requests]

    def col(values: list[float] | list[int], dtype: torch.dtype) -> torch.Tensor:
        return _tensor(values, dtype, device)

    top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    seeded = [i for i in random_rows if params[i].seed is not None]
    any_penalty = any(p.has_penalties for p in params)
    # Stop tokens are banned until min_tokens outputs exist.
    banned_rows: list[int] = []
    banned_ids: list[int] = []
    for i, (step, p) in enumerate(zip(steps, params)):
        if step < p.min_tokens:
            stops = set(p.stop_token_ids or ())
            if not p.ignore_eos:
                stops |= p.all_stop_token_ids
            stops = {t for t in stops if t < vocab_size}
            banned_rows += [i] * len(stops)
            banned_ids += sorted(stops)
    num_logprobs = [p.logprobs for p in params if p.logprobs is not None]
    return SamplingBatch(
        temperature=col([p.temperature for p in params], torch.float32),
        top_k=col(top_k, torch.int64),
        top_p=col([p.top_p for p in params], torch.float32),
        min_p=col([p.min_p for p in params], torch.float32),
        seeds=col([r.sampling_seed for r in requests], torch.int64),
        steps=col(steps, torch.int64),
        seeded_rows=col(seeded, torch.int64) if seeded else None,
        all_greedy=not random_rows,
        any_top_k=any(top_k[i] < vocab_size for i in random_rows),
        any_top_p=any(params[i].top_p < 1.0 for i in random_rows),
        any_min_p=any(params[i].min_p > 0.0 for i in random_rows),
        presence_penalty=col([p.presence_penalty for p in params], torch.float32)
        if any_penalty
        else None,
        frequency_penalty=col([p.frequency_penalty for p in params], torch.float32)
        if any_penalty
        else None,
        repetition_penalty=col([p.repetition_penalty for p in params], torch.float32)
        if any_penalty
        else None,
        output_token_ids=_output_ids(requests, steps, vocab_size, device, in_flight)
        if any_penalty
        else None,
        prompt_token_ids=_padded([r.prompt_token_ids for r in requests], vocab_size, device)
        if any_penalty
        else None,
        banned=(col(banned_rows, torch.int64), col(banned_ids, torch.int64))
        if banned_rows
        else None,
        max_num_logprobs=max(num_logprobs) if num_logprobs else -1,
    )
