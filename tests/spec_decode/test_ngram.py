"""The n-gram proposer against a brute-force reference, its incremental context buffer, and the
per-request acceptance counts and estimates."""

from __future__ import annotations

import numpy as np
import pytest

from compiled_llm.config import speculative_config_from
from compiled_llm.request import Request
from compiled_llm.sampling_params import SamplingParams
from compiled_llm.spec_decode.ngram import NgramProposer, ngram_lookup
from compiled_llm.spec_decode.state import SpecDecodeState, num_accepted


def reference(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """Brute force: longest suffix first, most recent earlier occurrence, then extend the
    continuation by feeding the proposal back as context."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = tokens[length - n :]
        for start in range(length - n - 1, -1, -1):  # occurrence tokens[start : start + n]
            if tokens[start : start + n] == suffix:
                ext = list(tokens)
                out = []
                for j in range(k):
                    out.append(ext[start + n + j])
                    ext.append(out[-1])
                return out
    return []


def test_examples() -> None:
    t = np.array([5, 6, 7, 8, 9, 5, 6, 7], dtype=np.int64)
    assert ngram_lookup(t, 1, 3, 2).tolist() == [8, 9]  # "5 6 7" seen before: 8 9 followed
    assert ngram_lookup(t, 1, 3, 5).tolist() == [8, 9, 5, 6, 7]
    # the most recent occurrence wins: after "1 2" came 3 first, later 4
    t = np.array([1, 2, 3, 1, 2, 4, 0, 1, 2], dtype=np.int64)
    assert ngram_lookup(t, 2, 2, 1).tolist() == [4]
    # the longest suffix wins over a more recent shorter one
    t = np.array([7, 1, 2, 3, 9, 1, 2, 4, 7, 1, 2], dtype=np.int64)
    assert ngram_lookup(t, 2, 3, 1).tolist() == [3]
    assert ngram_lookup(t, 2, 2, 1).tolist() == [4]
    # a short period repeats
    assert ngram_lookup(np.array([3, 3, 3], dtype=np.int64), 1, 5, 4).tolist() == [3, 3, 3, 3]
    # nothing long enough: no proposal
    t = np.array([1, 2, 3, 4, 1], dtype=np.int64)
    assert ngram_lookup(t, 2, 4, 3).tolist() == []
    assert ngram_lookup(t, 1, 4, 3).tolist() == [2, 3, 4]
    assert ngram_lookup(np.array([1], dtype=np.int64), 1, 3, 2).tolist() == []


@pytest.mark.parametrize("vocab", [2, 4, 20])
def test_matches_brute_force(vocab: int) -> None:
    rng = np.random.default_rng(vocab)
    for _ in range(300):
        length = int(rng.integers(1, 40))
        tokens = rng.integers(0, vocab, length).tolist()
        lo = int(rng.integers(1, 4))
        hi = lo + int(rng.integers(0, 4))
        k = int(rng.integers(1, 6))
        got = ngram_lookup(np.asarray(tokens, dtype=np.int64), lo, hi, k).tolist()
        assert got == reference(tokens, lo, hi, k), (tokens, lo, hi, k)


def request(prompt: list[int], max_tokens: int = 50) -> Request:
    r = Request("r", list(prompt), SamplingParams(max_tokens=max_tokens), max_tokens, 0)
    r.spec = SpecDecodeState(3)
    return r


def test_proposer_buffer_takes_new_tokens_only() -> None:
    config = speculative_config_from(
        {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}
    )
    assert config is not None
    proposer = NgramProposer(config)
    r = request([1, 2, 3, 4, 5])
    assert proposer.propose([r], [3]) == [[]]
    rng = np.random.default_rng(0)
    for _ in range(400):  # past the buffer's first capacity: it grows
        r.output_token_ids.append(int(rng.integers(0, 6)))
        got = proposer.propose([r], [3])[0]
        assert got == reference(r.all_token_ids, 1, 5, 3)
        assert r.spec is not None and r.spec.proposer_state.size == r.num_tokens


def test_num_accepted() -> None:
    assert num_accepted([], [4]) == 0
    assert num_accepted([1, 2, 3], [1, 2, 3, 9]) == 3
    assert num_accepted([1, 2, 3], [1, 5, 3, 9]) == 1
    assert num_accepted([1, 2, 3], [0, 2, 3, 9]) == 0


def test_acceptance_counts_and_estimates() -> None:
    s = SpecDecodeState(4)
    assert s.untried and s.recent_acceptance == s.gate_acceptance == 1.0
    for _ in range(3):
        s.on_verified(4, 0)
    s.set_drafts([], num_tokens=10)  # no proposal counts as a rejected first draft
    assert not s.untried
    assert s.recent_acceptance == pytest.approx(0.7**4 / (0.7**4 + (1 - 0.7**4) / 0.3))
    assert s.gate_acceptance == pytest.approx(0.9**4 / (0.9**4 + (1 - 0.9**4) / 0.1))
    s.on_verified(0, 0)  # an ordinary decode step: nothing changes
    s.on_verified(3, 2)
    assert (s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens) == (4, 15, 2)
    assert s.accepted_per_pos == [1, 1, 0, 0]


def test_drafts_go_stale_when_tokens_arrive() -> None:
    s = SpecDecodeState(2)
    s.set_drafts([7, 8], num_tokens=10)
    assert s.take_drafts(11) == []
    s.set_drafts([7, 8], num_tokens=10)
    assert s.take_drafts(10) == [7, 8]
    assert s.take_drafts(10) == []  # handed over once
