"""Beam search over the engine, as vLLM's `LLM.beam_search` does it: every step asks the engine
for one token of each live sequence with the logprobs of its 2 x beam_width most likely next
tokens (the prefix cache holds the sequences' shared KV), extends each sequence by each
candidate, and keeps the beam_width best candidates per prompt. A candidate ending in an EOS
token (the engine's: tokenizer, model config and generation config) is complete and leaves the
beam (unless `ignore_eos`); at the end the complete and live sequences compete together on the
length-penalized score.

`BeamSearch` holds the search and never calls the engine: a driver sends `next_requests()` with
`step_params` and hands the outputs to `advance`, until there are no requests left. `LLM`
drives it with `generate` (`beam_search` below), the server with its async engine."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from compiled_llm.outputs import BeamSearchOutput, BeamSearchSequence, RequestOutput
from compiled_llm.sampling_params import BeamSearchParams, SamplingParams


def check_beam_width(width: int, max_logprobs: int, field: str) -> None:
    """ValueError naming `field` (the caller's name for the width) where a step's 2 x width
    logprobs exceed the engine's max_logprobs."""
    if max_logprobs != -1 and 2 * width > max_logprobs:
        raise ValueError(
            f"{field}={width} needs {2 * width} logprobs per token, over this engine's "
            f"max_logprobs={max_logprobs}"
        )


def beam_score(seq: BeamSearchSequence, eos_ids: set[int], length_penalty: float) -> float:
    """vLLM's score: cumulative logprob / (length, prompt included, a final EOS not) ** penalty."""
    length = len(seq.tokens) - (1 if seq.tokens and seq.tokens[-1] in eos_ids else 0)
    return seq.cum_logprob / (length**length_penalty)


class BeamSearch:
    def __init__(
        self,
        prompts: Sequence[Any],
        params: BeamSearchParams,
        eos_ids: set[int],
        max_model_len: int,
    ) -> None:
        self.prompts = list(prompts)
        self.params = params
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len
        self.step_params = SamplingParams(
            n=1,
            temperature=params.temperature,
            max_tokens=1,
            ignore_eos=True,  # EOS is a candidate like any other token; the search decides
            logprobs=2 * params.beam_width,
            detokenize=False,
        )
        self.prompt_lengths: list[int] = [0] * len(self.prompts)  # known after the first step
        self._steps = 0
        self._beams: list[list[BeamSearchSequence]] = [[] for _ in self.prompts]
        self._completed: list[list[BeamSearchSequence]] = [[] for _ in self.prompts]
        self._live: list[tuple[int, BeamSearchSequence | None]] = []

    def _key(self, seq: BeamSearchSequence) -> float:
        return beam_score(seq, self.eos_ids, self.params.length_penalty)

    def next_requests(self) -> list[Any]:
        """The prompts of the next step ([]: the search is over). The first step sends the
        prompts as given (the engine tokenizes them), later ones each live sequence's ids."""
        live: list[tuple[int, BeamSearchSequence | None]] = []
        if self._steps == 0:
            live = [(i, None) for i in range(len(self.prompts))]
        elif self._steps < self.params.max_tokens:
            for i, instance in enumerate(self._beams):
                kept = []
                for seq in instance:
                    if len(seq.tokens) < self.max_model_len:
                        live.append((i, seq))
                        kept.append(seq)
                    else:  # no room for another token
                        self._completed[i].append(dataclasses.replace(seq, finish_reason="length"))
                self._beams[i] = kept
        self._live = live
        return [
            self.prompts[i] if seq is None else {"prompt_token_ids": seq.tokens} for i, seq in live
        ]

    def advance(self, outputs: Sequence[RequestOutput]) -> None:
        """Extend the sequences sent by `next_requests` with the engine's outputs for them."""
        candidates: list[list[BeamSearchSequence]] = [[] for _ in self.prompts]
        for (i, beam), out in zip(self._live, outputs, strict=True):
            if beam is None:
                self.prompt_lengths[i] = len(out.prompt_token_ids)
            parent = beam or BeamSearchSequence(list(out.prompt_token_ids), [])
            (top,) = out.outputs[0].logprobs or [{}]
            for token, lp in top.items():
                child = BeamSearchSequence(
                    parent.tokens + [token],
                    parent.logprobs + [top],
                    parent.cum_logprob + lp.logprob,
                )
                if token in self.eos_ids and not self.params.ignore_eos:
                    self._completed[i].append(dataclasses.replace(child, finish_reason="stop"))
                else:
                    candidates[i].append(child)
        width = self.params.beam_width
        self._beams = [sorted(c, key=self._key, reverse=True)[:width] for c in candidates]
        self._steps += 1

    def results(self, decode: Callable[[list[int]], str] | None) -> list[BeamSearchOutput]:
        """Per prompt the beam_width best sequences, complete or not, best first; `text` is
        `decode(tokens)` (None without `decode`)."""
        results = []
        for done, live in zip(self._completed, self._beams, strict=True):
            everything = done + [dataclasses.replace(s, finish_reason="length") for s in live]
            best = sorted(everything, key=self._key, reverse=True)[: self.params.beam_width]
            for seq in best:
                seq.text = decode(seq.tokens) if decode is not None else None
            results.append(BeamSearchOutput(best))
        return results


def beam_search(
    generate: Callable[[list[Any], SamplingParams], list[RequestOutput]],
    prompts: Sequence[Any],
    params: BeamSearchParams,
    eos_ids: set[int],
    max_model_len: int,
    decode: Callable[[list[int]], str] | None,
) -> list[BeamSearchOutput]:
    """The search driven by `generate(prompts, sampling_params)`, one engine batch a step."""
    search = BeamSearch(prompts, params, eos_ids, max_model_len)
    while requests := search.next_requests():
        search.advance(generate(requests, search.step_params))
    return search.results(decode)
