"""`LLM.beam_search` (vLLM's) on a tiny model, against a beam search of the same rule computed
from HF transformers' float32 forwards (no engine, no KV cache)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch

from compiled_llm import LLM, BeamSearchParams, SamplingParams
from compiled_llm.beam_search import beam_search
from compiled_llm.outputs import Logprob

# Prompts whose searches cut no near-tie on the tiny model (the smallest score gap at a cut is
# 2e-3 or more), so that the engine must pick exactly the reference's sequences.
PROMPTS = [
    "Beam search keeps the",
    "The weather today is",
    "Paged attention stores keys and values in",
]
NEAR_TIE = 1e-3  # scores closer than this: float32 rounding may order them either way


@pytest.fixture(scope="module")
def llm(tiny_models) -> LLM:
    return LLM(str(tiny_models("llama")), max_model_len=256, enforce_eager=True)


def hf_next_logprobs(model) -> Callable[[list[int]], torch.Tensor]:  # noqa: ANN001
    """Next-token logprobs of a sequence from a full float32 forward (float64 softmax)."""

    def next_logprobs(tokens: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([tokens])).logits[0, -1].double().log_softmax(-1)

    return next_logprobs


def reference(
    next_logprobs: Callable[[list[int]], torch.Tensor],
    prompt_ids: list[int],
    params: BeamSearchParams,
    eos_ids: set[int],
) -> tuple[list[tuple[list[int], float]], float]:
    """(best sequences as (tokens, cum_logprob), smallest score gap at a cut): each step every
    live sequence's 2 x width most likely next tokens as candidates, sequences ending in EOS
    complete, the width best kept."""

    def score(seq: tuple[list[int], float]) -> float:
        tokens, cum = seq
        return cum / (len(tokens) - (tokens[-1] in eos_ids)) ** params.length_penalty

    def cut(seqs: list, width: int) -> tuple[list, float]:
        seqs = sorted(seqs, key=score, reverse=True)
        gap = score(seqs[width - 1]) - score(seqs[width]) if len(seqs) > width else math.inf
        return seqs[:width], gap

    beams, completed, smallest = [(list(prompt_ids), 0.0)], [], math.inf
    for _ in range(params.max_tokens):
        candidates = []
        for tokens, cum in beams:
            values, ids = next_logprobs(tokens).topk(2 * params.beam_width)
            for v, t in zip(values.tolist(), ids.tolist(), strict=True):
                child = (tokens + [t], cum + v)
                ends = t in eos_ids and not params.ignore_eos
                (completed if ends else candidates).append(child)
        beams, gap = cut(candidates, params.beam_width)
        smallest = min(smallest, gap)
    best, gap = cut(completed + beams, params.beam_width)
    return best, min(smallest, gap)


@pytest.mark.parametrize("width,length_penalty", [(2, 1.0), (3, 0.5)])
def test_beam_search_matches_reference(
    tiny_models, llm: LLM, width: int, length_penalty: float
) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_models("llama"), dtype=torch.float32).eval()
    params = BeamSearchParams(beam_width=width, max_tokens=5, length_penalty=length_penalty)
    outputs = llm.beam_search(PROMPTS, params)
    assert len(outputs) == len(PROMPTS)
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        prompt_ids = llm.tokenizer(prompt).input_ids
        eos_ids = llm.engine.processor.eos_ids
        want, gap = reference(hf_next_logprobs(hf), prompt_ids, params, eos_ids)
        assert len(out.sequences) == width
        for seq in out.sequences:  # tokens and text include the prompt (vLLM's)
            assert seq.tokens[: len(prompt_ids)] == prompt_ids
            assert seq.text == llm.tokenizer.decode(seq.tokens)
            assert len(seq.logprobs) == len(seq.tokens) - len(prompt_ids)
            with torch.no_grad():  # the sequence's own logprob, from one HF forward
                lp = hf(torch.tensor([seq.tokens])).logits[0, :-1].double().log_softmax(-1)
            own = lp[
                torch.arange(len(prompt_ids) - 1, len(seq.tokens) - 1),
                seq.tokens[len(prompt_ids) :],
            ]
            assert seq.cum_logprob == pytest.approx(float(own.sum()), abs=1e-3)
        assert gap > NEAR_TIE, f"a near-tie in {prompt!r}'s search: choose another prompt"
        assert [s.tokens for s in out.sequences] == [t for t, _ in want]


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_eos_completes_a_sequence(ignore_eos: bool) -> None:
    """The search itself on a made-up model (next token's logprobs by the last token, EOS the
    likeliest after token 2): a sequence that reaches EOS is complete and leaves the beam
    (finish_reason "stop"), then competes on its score, EOS not counted in its length; with
    ignore_eos it goes on like any other."""
    vocab, eos = 6, 5
    table = torch.randn(
        vocab, vocab, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    table[2, eos] = 4.0
    table = table.log_softmax(-1)

    def next_logprobs(tokens: list[int]) -> torch.Tensor:
        return table[tokens[-1]]

    def generate(requests: list, sampling: SamplingParams) -> list:
        outputs = []
        for r in requests:
            tokens = r["prompt_token_ids"]
            values, ids = next_logprobs(tokens).topk(sampling.logprobs)
            top = {t: Logprob(v) for t, v in zip(ids.tolist(), values.tolist(), strict=True)}
            completion = SimpleNamespace(logprobs=[top])
            outputs.append(SimpleNamespace(prompt_token_ids=tokens, outputs=[completion]))
        return outputs

    params = BeamSearchParams(beam_width=2, max_tokens=4, ignore_eos=ignore_eos)
    prompt = [1, 2, 3]
    (out,) = beam_search(generate, [{"prompt_token_ids": prompt}], params, {eos}, 64, None)
    want, gap = reference(next_logprobs, prompt, params, {eos})
    assert gap > NEAR_TIE
    assert [s.tokens for s in out.sequences] == [t for t, _ in want]
    assert [s.cum_logprob for s in out.sequences] == pytest.approx([c for _, c in want])
    stopped = [s for s in out.sequences if s.finish_reason == "stop"]
    assert all(s.tokens[-1] == eos for s in stopped)
    assert bool(stopped) != ignore_eos  # the made-up model makes EOS win a place
    # max_model_len 5: the live sequences end at 5 tokens, 2 generated, as with max_tokens=2
    (short,) = beam_search(generate, [{"prompt_token_ids": prompt}], params, {eos}, 5, None)
    two = dataclasses.replace(params, max_tokens=2)
    want, _ = reference(next_logprobs, prompt, two, {eos})
    assert [s.tokens for s in short.sequences] == [t for t, _ in want]
    assert all(len(s.tokens) <= 5 for s in short.sequences)


def test_width_one_is_greedy(llm: LLM) -> None:
    greedy = llm.generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False
    )
    beams = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=1, max_tokens=6, ignore_eos=True))
    for g, b in zip(greedy, beams, strict=True):
        (seq,) = b.sequences
        assert seq.tokens == g.prompt_token_ids + g.outputs[0].token_ids
        assert seq.finish_reason == "length"


def test_bad_beam_search_params(llm: LLM) -> None:
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    with pytest.raises(ValueError, match="length_penalty"):
        BeamSearchParams(beam_width=2, max_tokens=4, length_penalty=float("nan"))
    with pytest.raises(ValueError, match="beam_width"):  # 2 x 11 logprobs > max_logprobs (20)
        llm.beam_search(PROMPTS, BeamSearchParams(beam_width=11, max_tokens=4))
    with pytest.raises(ValueError, match="params"):
        llm.beam_search(PROMPTS, SamplingParams())  # type: ignore[arg-type]
