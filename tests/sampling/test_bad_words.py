"""`SamplingParams.bad_words` (vLLM's): a word's last token is banned whenever the output so far
ends with the word's other tokens. Oracle: the same greedy decoding done one token at a time,
with the bans computed on the host by that rule and applied as logit biases; with async
scheduling on (the newest token still on the device when the next batch is built) and off."""

from __future__ import annotations

from pathlib import Path

import pytest

from compiled_llm import LLM, SamplingParams

PROMPT = [1, 40, 41, 42, 43, 44]
N = 12


@pytest.fixture(scope="module")
def model(tiny_models) -> Path:
    return Path(tiny_models("llama"))


@pytest.fixture(scope="module", params=[True, False], ids=["async", "sync"])
def llm(model: Path, request: pytest.FixtureRequest) -> LLM:
    return LLM(str(model), max_model_len=64, enforce_eager=True, async_scheduling=request.param)


def greedy(llm: LLM, prompt: list[int], n: int, **kw: object) -> list[int]:
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)  # type: ignore[arg-type]
    return (
        llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0].token_ids
    )


def reference(llm: LLM, words: list[list[int]], n: int) -> list[int]:
    """Greedy, one token per request, each word's last token biased away (-100) where the
    output so far ends with the word's other tokens."""
    out: list[int] = []
    for _ in range(n):
        bans = {w[-1] for w in words if len(w) == 1 or out[len(out) - len(w) + 1 :] == w[:-1]}
        bias = {t: -100.0 for t in bans} or None
        out += greedy(llm, PROMPT + out, 1, logit_bias=bias)
    return out


def word_of(llm: LLM, tokens: list[int]) -> str | None:
    """A string whose tokens (as bad_words tokenizes it, left-stripped) are `tokens`."""
    tok = llm.engine.processor.tokenizer
    text = tok.decode(tokens)
    if text.strip() and tok.encode(text.lstrip(), add_special_tokens=False) == tokens:
        return text
    return None


def test_matches_the_rule_token_by_token(llm: LLM) -> None:
    plain = greedy(llm, PROMPT, N)
    # two-token words taken from the plain output, so that the bans do come into play
    words = [w for w in (word_of(llm, plain[i : i + 2]) for i in range(2, N - 2)) if w][:2]
    assert words, "no output pair round-trips through the tokenizer"
    resolved = llm.engine.processor._bad_words(SamplingParams(bad_words=words))
    got = greedy(llm, PROMPT, N, bad_words=words)
    assert got != plain
    assert got == reference(llm, resolved, N)
    for w in resolved:  # no word appears whole
        assert all(got[i : i + len(w)] != w for i in range(len(got)))


def test_one_token_words_never_appear(llm: LLM) -> None:
    plain = greedy(llm, PROMPT, N)
    word = next(w for w in (word_of(llm, [t]) for t in plain) if w)
    resolved = llm.engine.processor._bad_words(SamplingParams(bad_words=[word]))
    got = greedy(llm, PROMPT, N, bad_words=[word])
    assert not {w[0] for w in resolved} & set(got)
    assert got == reference(llm, resolved, N)


@pytest.mark.parametrize("bad", [[""], ["  "], "word", [3]])
def test_bad_values_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="^bad_words"):
        SamplingParams(bad_words=bad)  # type: ignore[arg-type]


def test_needs_a_tokenizer(model: Path) -> None:
    llm = LLM(str(model), max_model_len=64, enforce_eager=True, skip_tokenizer_init=True)
    with pytest.raises(ValueError, match="^bad_words needs a tokenizer"):
        llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(bad_words=["x"]), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
