"""Beam search over the engine, as vLLM's `LLM.beam_search` does it: every step asks the engine
for one token of each live sequence with the logprobs of its 2 x beam_width most likely next
tokens (the prefix cache holds the sequences' shared KV), extends each sequence by each
candidate, and keeps the beam_width best candidates per prompt. A candidate ending in an EOS
token (the engine's: tokenizer, model config and generation config) is complete and leaves the
beam (unless `ignore_eos`); at the end the complete and live sequences compete together on the
length-penalized score."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from compiled_llm.outputs import BeamSearchOutput, BeamSearchSequence, RequestOutput
from compiled_llm.sampling_params import BeamSearchParams, SamplingParams


def beam_score(seq: BeamSearchSequence, eos_ids: set[int], length_penalty: float) -> float:
    """vLLM's score: cumulative logprob / (length, prompt included, a final EOS not) ** penalty."""
    length = len(seq.tokens) - (1 if seq.tokens and seq.tokens[-1] in eos_ids else 0)
    return seq.cum_logprob / (length**length_penalty)


def beam_search(
    generate: Callable[[list[Any], SamplingParams], list[RequestOutput]],
    prompts: Sequence[Any],
    params: BeamSearchParams,
    eos_ids: set[int],
    max_model_len: int,
    decode: Callable[[list[int]], str] | None,
) -> list[BeamSearchOutput]:
    """`generate(prompts, sampling_params)` runs one batch on the engine (LLM.generate)."""
    step_params = SamplingParams(
        n=1,
        temperature=params.temperature,
        max_tokens=1,
        ignore_eos=True,  # EOS is a candidate like any other token; the search decides
        logprobs=2 * params.beam_width,
        detokenize=False,
    )

    def key(seq: BeamSearchSequence) -> float:
        return beam_score(seq, eos_ids, params.length_penalty)

    beams: list[list[BeamSearchSequence]] = [[] for _ in prompts]
    completed: list[list[BeamSearchSequence]] = [[] for _ in prompts]
    for step in range(params.max_tokens):
        # Step 0 sends the prompts as given (the engine tokenizes them); then token ids.
        live: list[tuple[int, BeamSearchSequence | None]] = (
            [(i, None) for i in range(len(prompts))] if step == 0 else []
        )
        for i, instance in enumerate(beams):
            for seq in instance:
                if len(seq.tokens) < max_model_len:
                    live.append((i, seq))
                else:  # no room for another token
                    completed[i].append(dataclasses.replace(seq, finish_reason="length"))
        beams = [[] for _ in prompts]
        if not live:
            break
        requests = [
            prompts[i] if beam is None else {"prompt_token_ids": beam.tokens} for i, beam in live
        ]
        outputs = generate(requests, step_params)
        candidates: list[list[BeamSearchSequence]] = [[] for _ in prompts]
        for (i, beam), out in zip(live, outputs, strict=True):
            parent = beam or BeamSearchSequence(list(out.prompt_token_ids), [])
            (top,) = out.outputs[0].logprobs or [{}]
            for token, lp in top.items():
                child = BeamSearchSequence(
                    parent.tokens + [token],
                    parent.logprobs + [top],
                    parent.cum_logprob + lp.logprob,
                )
                if token in eos_ids and not params.ignore_eos:
                    completed[i].append(dataclasses.replace(child, finish_reason="stop"))
                else:
                    candidates[i].append(child)
        beams = [sorted(c, key=key, reverse=True)[: params.beam_width] for c in candidates]
    results = []
    for done, live_beams in zip(completed, beams, strict=True):
        everything = done + [dataclasses.replace(s, finish_reason="length") for s in live_beams]
        best = sorted(everything, key=key, reverse=True)[: params.beam_width]
        for seq in best:
            seq.text = decode(seq.tokens) if decode is not None else None
        results.append(BeamSearchOutput(best))
    return results
