"""N-gram proposer (prompt lookup): the next tokens are guessed to be what followed the last
time the context's final n tokens appeared in it.

For n from prompt_lookup_max down to prompt_lookup_min, find the most recent earlier occurrence
of the context's last n tokens (prompt + output) and propose the k tokens that followed it. When
fewer than k tokens follow (the occurrence is near the end: the text repeats with a short
period), the continuation repeats that period. numpy, vectorized over the context: a few array
passes of its length per request and step, and the context is kept in a buffer that only takes
the new tokens each step.
"""

from __future__ import annotations

import numpy as np

from compiled_llm.config import SpeculativeConfig
from compiled_llm.request import Request


def ngram_lookup(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> np.ndarray:
    """The proposal for context `tokens` (1-D int64): up to `k` tokens, empty when no suffix of
    `min_n`..`max_n` tokens occurred earlier. The longest suffix that did wins; among its
    occurrences the most recent."""
    length = len(tokens)
    max_n = min(max_n, length - 1)
    if k < 1 or max_n < min_n:
        return tokens[:0]
    # match[i]: the last n tokens also end at index i (i <= length - 2: something follows).
    # Grown one token of suffix at a time; it only loses entries.
    match = tokens[:-1] == tokens[-1]
    found = 0
    for n in range(1, max_n + 1):
        if n > 1:
            longer = np.zeros_like(match)
            longer[n - 1 :] = match[n - 1 :] & (tokens[: length - n] == tokens[length - n])
            if not longer.any():
                break
            match = longer
        elif not match.any():
            break
        found = n
    if found < min_n:
        return tokens[:0]
    end = len(match) - 1 - int(np.argmax(match[::-1]))  # the most recent occurrence
    start = end + 1
    period = length - start
    return tokens[start + np.arange(k) % period]


class _TokenBuffer:
    """A request's context as a growing numpy array, appended to as tokens arrive."""

    def __init__(self) -> None:
        self.data = np.empty(256, dtype=np.int64)
        self.size = 0

    def sync(self, request: Request) -> np.ndarray:
        total = request.num_tokens
        if total > len(self.data):
            grown = np.empty(max(total, 2 * len(self.data)), dtype=np.int64)
            grown[: self.size] = self.data[: self.size]
            self.data = grown
        num_prompt = request.num_prompt_tokens
        if self.size < num_prompt:
            self.data[self.size : num_prompt] = request.prompt_token_ids[self.size :]
            self.size = num_prompt
        if self.size < total:
            self.data[self.size : total] = request.output_token_ids[self.size - num_prompt :]
            self.size = total
        return self.data[:total]


class NgramProposer:
    """Proposes from each request's own context, on the host."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max

    def propose(self, requests: list[Request], max_drafts: list[int]) -> list[list[int]]:
        out = []
        for request, k in zip(requests, max_drafts):
            state = request.spec
            assert state is not None
            if state.proposer_state is None:
                state.proposer_state = _TokenBuffer()
            tokens = state.proposer_state.sync(request)
            out.append(ngram_lookup(tokens, self.min_n, self.max_n, k).tolist())
        return out
