"""The token bitmask: filled from xgrammar's matcher, applied to logits in the sampler (with
xgrammar's kernel). Oracles: the matcher's verdict on each token, and xgrammar's plain-torch
backend of the same kernel."""

from __future__ import annotations

import pytest
import torch
import xgrammar as xgr

from compiled_llm.request import Request
from compiled_llm.sampling.batch import build_sampling_batch
from compiled_llm.sampling.sampler import Sampler, apply_token_bitmask
from compiled_llm.sampling_params import SamplingParams
from compiled_llm.sampling_params import StructuredOutputsParams as SO
from compiled_llm.structured_output.manager import (
    RequestGrammar,
    StructuredOutputManager,
    bitmask_width,
)

# A toy vocabulary: digits, letters, punctuation, a few multi-character tokens, EOS last.
VOCAB = [*"0123456789", *"abcdefxyz", *'-_ {}":,', "12", "ab", "-a", "</s>"]
EOS = len(VOCAB) - 1
PADDED = 40  # the model's vocabulary is wider than the tokenizer's, as for Qwen


def compiled(regex: str) -> xgr.CompiledGrammar:
    info = xgr.TokenizerInfo(VOCAB, vocab_size=PADDED, stop_token_ids=[EOS])
    return xgr.GrammarCompiler(info).compile_regex(regex)


def allowed_by_matcher(matcher: xgr.GrammarMatcher) -> set[int]:
    """Tokens the matcher itself accepts next (each tried on a fork)."""
    ok = set()
    for t in range(len(VOCAB)):
        fork = matcher.fork()
        if fork.accept_token(t):
            ok.add(t)
    return ok


@pytest.mark.parametrize("prefix", [[], [1], [1, 2], [1, 2, 3, VOCAB.index("-")]])
def test_masked_logits_match_the_matcher_and_xgrammar(prefix: list[int]) -> None:
    matcher = xgr.GrammarMatcher(compiled(r"[0-9]{2,3}-[a-f]+"), override_stop_tokens=[EOS])
    for t in prefix:
        assert matcher.accept_token(t)
    # rows 0 and 2 have no grammar: all ones
    mask = torch.full((3, bitmask_width(PADDED)), -1, dtype=torch.int32)
    matcher.fill_next_token_bitmask(mask, 1)
    logits = torch.randn(3, PADDED)
    ours = apply_token_bitmask(logits.clone(), mask)
    assert torch.equal(ours[0], logits[0]) and torch.equal(ours[2], logits[2])
    reference = logits.clone()
    xgr.apply_token_bitmask_inplace(reference, mask, indices=[1])
    assert torch.equal(ours, reference)
    finite = {int(t) for t in torch.nonzero(ours[1].isfinite()).flatten()}
    assert finite == allowed_by_matcher(matcher)
    assert finite  # the grammar can always continue here


def inline_manager(max_rows: int = 8) -> StructuredOutputManager:
    """A manager with the matchers in this process, compiling for the toy vocabulary."""
    manager = StructuredOutputManager("unused", PADDED, max_rows=max_rows, pin_memory=False)
    info = xgr.TokenizerInfo(VOCAB, vocab_size=PADDED, stop_token_ids=[EOS])
    manager._channel.matchers._compiler = xgr.GrammarCompiler(info)  # type: ignore[union-attr]
    return manager


def _grammar(
    manager: StructuredOutputManager, regex: str, accepted: list[int], stops: set[int] | None = None
) -> RequestGrammar:
    params = SamplingParams(structured_outputs=SO(regex=regex))
    g = manager.grammar_for(params.clone(all_stop_token_ids={EOS} if stops is None else stops))
    while not g.ready():
        manager.wait_compiled(1.0)
    assert g.error is None
    for t in accepted:
        assert g.accept(t)
    return g


def matcher_of(manager: StructuredOutputManager, g: RequestGrammar) -> xgr.GrammarMatcher:
    return manager._channel.matchers._matchers[g.key]  # type: ignore[union-attr]


def test_sampler_masks_only_grammar_rows() -> None:
    """Greedy: the unconstrained row keeps its argmax, the constrained row takes the best
    allowed token; random sampling only ever draws allowed tokens; logprobs are of the
    constrained distribution."""
    torch.manual_seed(0)
    logits = torch.randn(PADDED)
    logits[VOCAB.index("x")] = 10.0  # the favourite, which the grammar forbids
    greedy = SamplingParams(temperature=0.0, logprobs=2)
    random = SamplingParams(temperature=1.0, seed=3)
    reqs = [Request(f"r{i}", [1], p, 8, 7) for i, p in enumerate([greedy, greedy, random])]
    for r in reqs:
        r.num_pending_output_tokens = 1
    manager = inline_manager()
    grammars = [None, _grammar(manager, "[0-9]+", []), _grammar(manager, "[0-9]+", [])]
    mask = manager.bitmask(grammars)
    assert mask is not None and mask.shape[0] == 3
    assert torch.equal(mask[0], torch.full_like(mask[0], -1))  # no grammar: all allowed
    digits = set(range(10)) | {VOCAB.index("12")}
    for _ in range(20):
        batch = build_sampling_batch(reqs, PADDED, torch.device("cpu"))
        batch.token_bitmask = mask
        out = Sampler()(logits.expand(3, -1).clone(), batch)
        first, constrained, drawn = out.token_ids.tolist()
        assert first == VOCAB.index("x")
        allowed = torch.full_like(logits, float("-inf"))
        allowed[list(digits)] = logits[list(digits)]
        assert constrained == int(allowed.argmax())
        assert drawn in digits
        assert out.sampled_logprobs is not None and out.topk_ids is not None
        assert torch.isfinite(out.sampled_logprobs[1])
        assert set(out.topk_ids[1].tolist()) <= digits
        reqs[2].sampling_params = random.clone(seed=_ + 10)


def test_grammar_end_and_refusal() -> None:
    """A stop token ends the grammar at once (the mask allows one only where it may end); a
    token the matcher refuses is reported with the next bitmask, whose row then allows
    everything, and the handle refuses tokens from then on."""
    manager = inline_manager()
    g = _grammar(manager, "ab", [VOCAB.index("ab")])
    assert not g.is_terminated()
    assert g.accept(EOS) and g.is_terminated()
    bad = _grammar(manager, "ab", [])
    assert bad.accept(VOCAB.index("x"))  # not checked yet
    mask = manager.bitmask([g, bad])
    assert mask is not None and torch.equal(mask[1], torch.full_like(mask[1], -1))
    assert bad.error is not None and "no token" in bad.error
    assert not bad.accept(VOCAB.index("a"))
    assert g.error is None and matcher_of(manager, g).is_terminated()


def test_a_zero_noise_draw_never_picks_a_masked_token() -> None:
    """The exponential race divides by the noise: a draw of exactly 0 must not turn a masked
    token (probability 0) into NaN, which argmax would pick."""
    from unittest import mock

    reqs = [Request("r", [1], SamplingParams(temperature=1.0), 8, 7)]
    reqs[0].num_pending_output_tokens = 1
    batch = build_sampling_batch(reqs, PADDED, torch.device("cpu"))
    mask = torch.zeros((1, bitmask_width(PADDED)), dtype=torch.int32)
    mask[0, 0] = 1 << 3  # only token 3
    batch.token_bitmask = mask
    zeros = torch.zeros(1, PADDED)
    with mock.patch.object(torch.Tensor, "exponential_", lambda self: zeros.clone()):
        out = Sampler()(torch.randn(1, PADDED), batch)
    assert out.token_ids.tolist() == [3]


def plain_fill(manager: StructuredOutputManager, g: RequestGrammar | None) -> torch.Tensor:
    """The oracle row of a request's grammar: all allowed (-1), then its matcher's own fill
    unless it has finished (or there is none)."""
    row = torch.full((1, bitmask_width(PADDED)), -1, dtype=torch.int32)
    if g is not None and not g.is_terminated():
        matcher_of(manager, g).fill_next_token_bitmask(row, 0)
    return row[0]


def test_batched_fill_equals_row_by_row() -> None:
    """The manager fills several rows on xgrammar's threads; each row equals its matcher's own
    fill, rows without a grammar or with a finished one allow everything."""
    manager = inline_manager()
    grammars = [
        _grammar(manager, r"[0-9]{2,3}-[a-f]+", [1]),
        None,
        _grammar(manager, r"[0-9]{2,3}-[a-f]+", [1, 2, 3, VOCAB.index("-")]),
        _grammar(manager, "ab", [VOCAB.index("ab"), EOS]),  # terminated
        _grammar(manager, "[a-z]+", []),
    ]
    mask = manager.bitmask(grammars)
    assert mask is not None and mask.shape[0] == len(grammars)
    for i, g in enumerate(grammars):
        assert torch.equal(mask[i], plain_fill(manager, g)), i


def test_no_stop_id_in_vocabulary_ends_on_the_tokenizers_eos() -> None:
    """A request whose stop ids all lie outside the vocabulary (a model whose vocabulary is
    narrower than its tokenizer's eos id) gets a matcher ending on the tokenizer's EOS, not a
    failed grammar (xgrammar refuses an empty stop list)."""
    manager = inline_manager()
    g = _grammar(manager, "ab", [], stops={PADDED + 5})
    assert g.stop_token_ids == {EOS}
    assert g.accept(VOCAB.index("ab")) and g.accept(EOS) and g.is_terminated()
    manager.bitmask([g])
    assert g.error is None and matcher_of(manager, g).is_terminated()


def test_bitmask_on_a_stale_buffer_equals_the_plain_fill() -> None:
    """The manager does not clear its buffers (they are reused every other step) and writes
    only the rows xgrammar does not fill. Oracle: a buffer of -1 filled row by row with each
    matcher's own fill, at every step of random walks through several grammars, with the
    manager's buffers full of garbage each time."""
    import random

    rng = random.Random(0)
    manager = inline_manager()
    grammars = [
        _grammar(manager, r"[0-9]{2,3}-[a-f]+", []),
        None,
        _grammar(manager, r"\{\"a\": [0-9]+(, \"b\": \"[a-z]*\")?\}", []),
        _grammar(manager, "ab", [VOCAB.index("ab"), EOS]),  # terminated
        _grammar(manager, "[a-z]+(_[0-9])*", []),
        _grammar(manager, "(12|ab)+", []),
    ]
    shifts = torch.arange(32, dtype=torch.int32)
    for step in range(12):
        garbage = torch.randint(-(2**31), 2**31 - 1, manager.buffers.shape, dtype=torch.int32)
        manager.buffers.copy_(garbage)
        mask = manager.bitmask(grammars)
        assert mask is not None and mask.shape[0] == len(grammars)
        for i, g in enumerate(grammars):
            expected = plain_fill(manager, g)
            assert torch.equal(mask[i], expected), (step, i)
            if g is None:
                continue
            if g.is_terminated():
                continue
            allowed = ((expected[:, None] >> shifts) & 1).bool().flatten()[: len(VOCAB)]
            token = rng.choice(allowed.nonzero().flatten().tolist())
            assert g.accept(token)


def test_draft_rows_are_the_grammar_after_each_draft() -> None:
    """A verifying step's rows for a grammar sample: row j is the mask after its first j drafts
    (oracle: a fresh matcher fed that prefix); rows after a refused draft, or after one that
    ends the grammar, allow everything; the drafts are rolled back afterwards."""
    manager = inline_manager(max_rows=16)
    code = r"[0-9]{2,3}-[a-f]+"
    g, h = _grammar(manager, code, []), _grammar(manager, "ab", [])
    dash, x, ab = VOCAB.index("-"), VOCAB.index("x"), VOCAB.index("ab")
    drafts = [[1, 2, dash, x, 3], [5], [ab, EOS, 1]]
    mask = manager.bitmask([g, None, h], drafts)
    assert mask is not None and mask.shape[0] == 6 + 2 + 4

    def after(regex: str, prefix: list[int]) -> torch.Tensor:
        matcher = xgr.GrammarMatcher(compiled(regex), override_stop_tokens=[EOS])
        assert all(matcher.accept_token(t) for t in prefix)
        row = torch.full((1, bitmask_width(PADDED)), -1, dtype=torch.int32)
        matcher.fill_next_token_bitmask(row, 0)
        return row[0]

    everything = torch.full_like(mask[0], -1)
    expected = [
        *(after(code, drafts[0][:j]) for j in range(4)),  # "x" after "12-" is refused
        everything,
        everything,
        everything,  # no grammar: 1 + 1 rows
        everything,
        after("ab", []),
        after("ab", [ab]),
        everything,  # EOS ended the grammar
        everything,
    ]
    for i, row in enumerate(expected):
        assert torch.equal(mask[i], row), i
    again = manager.bitmask([g, h])  # rolled back: the masks of the empty prefix
    assert again is not None
    assert torch.equal(again[0], after(code, [])) and torch.equal(again[1], after("ab", []))
    assert g.error is None and h.error is None


def test_released_grammars_leave_nothing_behind() -> None:
    """A sample's matcher goes when its request ends: after compiling, after a failed compile,
    or while still compiling (the matcher is then dropped when the compile ends)."""
    manager = inline_manager()
    matchers = manager._channel.matchers  # type: ignore[union-attr]
    ok, bad = SO(regex="[0-9]+"), SO(regex="[a-")
    done = _grammar(manager, "[0-9]+", [1])
    failed = manager.grammar_for(
        SamplingParams(structured_outputs=bad).clone(all_stop_token_ids={EOS})
    )
    while not failed.ready():
        manager.wait_compiled(1.0)
    assert failed.error is not None and "compile" in failed.error
    early = manager.grammar_for(
        SamplingParams(structured_outputs=ok).clone(all_stop_token_ids={EOS})
    )
    for g in (done, failed, early):
        g.release()
    matchers._executor.submit(lambda: None).result()  # the compile thread has finished
    assert not matchers._matchers and not matchers._compiling and not matchers._removed
