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
    owner: list[int],
    position: list[int],
    drafts: list[list[int]],
    steps: list[int],
    vocab_size: int,
    device: torch.device,
    in_flight: InFlightStep | None,
) -> torch.Tensor:
    """Each row's output ids so far, padded with vocab_size: its request's, then the drafts
    before the row's position (the row samples as if they were accepted). Under async scheduling
    the newest may still be on the device (sampled by `in_flight`; never for a request with
    drafts): it is appended from there, so the penalties see it without waiting for the step."""
    prefixes = [requests[i].output_token_ids + drafts[i][:j] for i, j in zip(owner, position)]
    ids = _padded(prefixes, vocab_size, device)
    missing = [r for r, (n, p) in enumerate(zip(steps, prefixes)) if n > len(p)]
    if not missing:
        return ids
    assert in_flight is not None and in_flight.device_tokens is not None
    assert all(steps[r] == len(prefixes[r]) + 1 and not drafts[owner[r]] for r in missing)
    src = [in_flight.row[requests[owner[r]].request_id] for r in missing]
    column = torch.full((len(owner),), vocab_size, dtype=torch.int64, device=device)
    column[_tensor(missing, torch.int64, device)] = in_flight.device_tokens[
        _tensor(src, torch.int64, device)
    ]
    return torch.cat([ids, column[:, None]], dim=1)


def _bans(
    rows: list[int],
    ids: list[int],
    requests: list[Request],
    owner: list[int],
    position: list[int],
    drafts: list[list[int]],
    steps: list[int],
    device: torch.device,
    in_flight: InFlightStep | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The step's bans as (row, token, ban) triples: the (rows, ids) pairs given, which always
    hold, and vLLM's bad_words: a word's last token is banned in a row whose output so far
    (drafts before the row included) ends with the word's other tokens. Under async scheduling
    a row's newest token may still be on the device (sampled by `in_flight`): a ban that depends
    on it holds where that token is the one the word needs, which the device decides (`ban`),
    so building the batch never waits for the step."""
    rows, ids = list(rows), list(ids)
    need = [-1] * len(rows)  # the newest token each ban needs (-1: none, the ban holds)
    src = [0] * len(rows)  # where that token is in in_flight.device_tokens
    for r, (i, j) in enumerate(zip(owner, position)):
        words = requests[i].sampling_params.bad_words_token_ids
        if not words:
            continue
        known = requests[i].output_token_ids + drafts[i][:j]
        pending = steps[r] > len(known)
        for *prefix, last in words:
            tail = prefix[:-1] if pending and prefix else prefix
            if len(known) < len(tail) or known[len(known) - len(tail) :] != tail:
                continue
            rows.append(r)
            ids.append(last)
            if pending and prefix:
                assert in_flight is not None
                need.append(prefix[-1])
                src.append(in_flight.row[requests[i].request_id])
            else:
                need.append(-1)
                src.append(0)
    if not rows:
        return None
    need_t = _tensor(need, torch.int64, device)
    ban = need_t < 0
    if any(n >= 0 for n in need):
        assert in_flight is not None and in_flight.device_tokens is not None
        newest = in_flight.device_tokens[_tensor(src, torch.int64, device)]
        ban = ban | (newest == need_t)
    return _tensor(rows, torch.int64, device), _tensor(ids, torch.int64, device), ban


def _tensor(
    values: list[float] | list[int], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def build_sampling_batch(
    requests: list[Request],
    vocab_size: int,
    device: torch.device,
    in_flight: InFlightStep | None = None,
    drafts: list[list[int]] | None = None,
) -> SamplingBatch:
    """One row per request, or with `drafts` (speculative decoding) 1 + len(drafts[i]) rows for
    request i: row j samples the token after draft j - 1, i.e. output index base + j, with the
    drafts before it counted as output (penalties, min_tokens) and that index's seeded noise.
    With `drafts` every random row draws the counter-based noise of its request's
    sampling_seed (random for a request that brings no seed), seeded or not: a draft model
    samples its drafts with that same noise (spec_decode, docs/speculative_decoding.md)."""
    verifying = drafts is not None
    drafts = drafts if drafts is not None else [[] for _ in requests]
    owner = [i for i, d in enumerate(drafts) for _ in range(len(d) + 1)]
    position = [j for d in drafts for j in range(len(d) + 1)]
    rows = [requests[i] for i in owner]
    params = [r.sampling_params for r in rows]
    # Index of the token each row samples in its request's output (scheduling already counted
    # the first as pending).
    steps = [
        requests[i].num_tokens_with_pending - requests[i].num_prompt_tokens - 1 + j
        for i, j in zip(owner, position)
    ]

    def col(values: list[float] | list[int], dtype: torch.dtype) -> torch.Tensor:
        return _tensor(values, dtype, device)

    top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    seeded = [i for i in random_rows if verifying or params[i].seed is not None]
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
    bias: tuple[list[int], list[int], list[float]] = ([], [], [])
    allowed: tuple[list[int], list[int]] = ([], [])
    for i, p in enumerate(params):
        if p.logit_bias:
            bias[0].extend([i] * len(p.logit_bias))
            bias[1].extend(p.logit_bias)
            bias[2].extend(p.logit_bias.values())
        if p.allowed_token_ids:
            allowed[0].extend([i] * len(p.allowed_token_ids))
            allowed[1].extend(p.allowed_token_ids)
    num_logprobs = [p.logprobs for p in params if p.logprobs is not None]
    draft_rows, draft_ids, draft_probs = _drafts_from_q(requests, drafts, device)
    return SamplingBatch(
        temperature=col([p.temperature for p in params], torch.float32),
        top_k=col(top_k, torch.int64),
        top_p=col([p.top_p for p in params], torch.float32),
        min_p=col([p.min_p for p in params], torch.float32),
        seeds=col([r.sampling_seed for r in rows], torch.int64),
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
        output_token_ids=_output_ids(
            requests, owner, position, drafts, steps, vocab_size, device, in_flight
        )
        if any_penalty
        else None,
        prompt_token_ids=_padded([r.prompt_token_ids for r in rows], vocab_size, device)
        if any_penalty
        else None,
        banned=_bans(
            banned_rows, banned_ids, requests, owner, position, drafts, steps, device, in_flight
        ),
        logit_bias=(
            col(bias[0], torch.int64),
            col(bias[1], torch.int64),
            col(bias[2], torch.float32),
        )
        if bias[0]
        else None,
        allowed=(col(allowed[0], torch.int64), col(allowed[1], torch.int64))
        if allowed[0]
        else None,
        max_num_logprobs=max(num_logprobs) if num_logprobs else -1,
        draft_rows=draft_rows,
        draft_token_ids=draft_ids,
        draft_probs=draft_probs,
    )


def _drafts_from_q(
    requests: list[Request], drafts: list[list[int]], device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The rows verifying drafts that were sampled from a distribution q under
    rejection_sampling (their request's `spec.draft_probs`, kept on the device by the draft
    model's proposer: a [>= len(drafts), V] row of q per draft), their drafts and q's rows, all
    requests' together; None where no request has any (ngram, coupled, greedy-only proposals)."""
    rows: list[int] = []
    ids: list[int] = []
    probs: list[torch.Tensor] = []
    base = 0
    for r, d in zip(requests, drafts):
        q = r.spec.draft_probs if r.spec is not None and d else None
        if q is not None:
            assert q.shape[0] >= len(d), "draft probs for fewer drafts than verified"
            rows += range(base, base + len(d))
            ids += d
            probs.append(q[: len(d)])
        base += 1 + len(d)
    if not rows:
        return None, None, None
    return (
        _tensor(rows, torch.int64, device),
        _tensor(ids, torch.int64, device),
        torch.cat(probs) if len(probs) > 1 else probs[0],
    )
