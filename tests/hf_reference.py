"""The HF transformers oracle of the model tests: greedy generation with `generate`, and the
comparison rule for our greedy tokens against it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TIE = 1e-4  # HF's top-2 logits closer than this: either token is a right answer


@dataclass(frozen=True)
class HFGreedy:
    tokens: list[int]
    margins: list[float]  # per step: HF's top-1 minus top-2 logit
    logprobs: list[float]  # per step: the chosen token's logprob


def hf_greedy(
    model: Any,
    prompts: Sequence[str | list[int]],
    max_new_tokens: int | Sequence[int],
    tokenizer: Any = None,
) -> list[HFGreedy]:
    """HF's greedy continuation of each prompt (text, tokenized by `tokenizer` or the model
    folder's, or token ids), exactly `max_new_tokens` (one count, or one per prompt) long.
    `model` is an HF causal LM or a folder to load one from (float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(model, str | Path):
        if tokenizer is None and any(isinstance(p, str) for p in prompts):
            tokenizer = AutoTokenizer.from_pretrained(model)
        model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    counts = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else max_new_tokens
    results = []
    for prompt, n in zip(prompts, counts, strict=True):
        ids = tokenizer(prompt, return_tensors="pt").input_ids if isinstance(prompt, str) else None
        ids = torch.tensor([prompt]) if ids is None else ids
        with torch.no_grad():
            out = model.generate(
                ids,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                output_logits=True,
                return_dict_in_generate=True,
            )
        top2 = [step[0].topk(2).values for step in out.logits]
        results.append(
            HFGreedy(
                tokens=out.sequences[0, ids.shape[1] :].tolist(),
                margins=[float(a - b) for a, b in top2],
                logprobs=[float(step[0].log_softmax(-1).max()) for step in out.logits],
            )
        )
    return results


def greedy_tokens(expected: list[HFGreedy]) -> list[list[int]]:
    return [e.tokens for e in expected]


def assert_matches_hf(expected: list[HFGreedy], got: list[list[int]], tie: float = TIE) -> None:
    """Token for token, except that a sequence may part from HF's where HF's two best logits are
    within `tie` (either token is right there); after that it follows another prefix and is not
    compared."""
    assert len(got) == len(expected)
    for i, (ref, ids) in enumerate(zip(expected, got)):
        assert len(ids) == len(ref.tokens), (i, ids, ref.tokens)
        for pos, (a, b) in enumerate(zip(ref.tokens, ids)):
            if a != b:
                assert ref.margins[pos] < tie, (
                    f"prompt {i} token {pos}: HF {a}, ours {b} (margin {ref.margins[pos]}; "
                    f"{ref.tokens} vs {ids})"
                )
                break
