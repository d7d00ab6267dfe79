"""Proposers by `method` name. A proposer guesses up to k next tokens for each of a batch of
decoding requests whose newest token is on the host; the scheduler hands them to the target's
next step as drafts. Proposers that run a model (`draft_model`: engine/draft_proposer.py) need
the engine's runner and KV cache, so the engine builds them and hands them to
`SpeculativeDecoder`; this registry holds the ones built from the config alone."""

from __future__ import annotations

import importlib
from typing import Protocol

from compiled_llm.config import SpeculativeConfig
from compiled_llm.request import Request

_PROPOSERS = {"ngram": "compiled_llm.spec_decode.ngram:NgramProposer"}


class Proposer(Protocol):
    def propose(self, requests: list[Request], max_drafts: list[int]) -> list[list[int]]:
        """Up to max_drafts[i] draft tokens for requests[i] (fewer, or none, is fine)."""
        ...


def available_methods() -> tuple[str, ...]:
    return tuple(_PROPOSERS)


def create_proposer(config: SpeculativeConfig) -> Proposer:
    if config.method not in _PROPOSERS:
        raise ValueError(
            f"speculative_config.method={config.method!r} has no proposer built from the "
            "config alone; available: " + ", ".join(_PROPOSERS)
        )
    module, name = _PROPOSERS[config.method].split(":")
    cls = getattr(importlib.import_module(module), name)
    proposer: Proposer = cls(config)
    return proposer
