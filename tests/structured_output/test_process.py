"""The grammar matchers in a process of their own (the default on CUDA). Oracle: the same
manager with the matchers inline, which test_bitmask.py checks against xgrammar's own fill."""

from __future__ import annotations

import os
import random
import signal

import pytest
import torch

from compiled_llm.models.loader import default_model_path, load_tokenizer
from compiled_llm.sampling_params import SamplingParams
from compiled_llm.sampling_params import StructuredOutputsParams as SO
from compiled_llm.structured_output.manager import RequestGrammar, StructuredOutputManager

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "tags": {"type": "array", "items": {"enum": ["a", "bc"]}, "maxItems": 3},
        "n": {"type": "integer", "minimum": 0},
    },
    "required": ["name", "tags", "n"],
}


def managers(rows: int) -> tuple[StructuredOutputManager, StructuredOutputManager, int]:
    path = default_model_path()
    tokenizer = load_tokenizer(path)
    vocab = len(tokenizer)
    inline, process = (
        StructuredOutputManager(path, vocab, max_rows=rows, pin_memory=False, matchers=where)
        for where in ("inline", "process")
    )
    return inline, process, int(tokenizer.eos_token_id)


def ready(manager: StructuredOutputManager, params: SamplingParams) -> RequestGrammar:
    g = manager.grammar_for(params)
    while not g.ready():
        manager.wait_compiled(5.0)
    assert g.error is None, g.error
    return g


def test_process_masks_equal_inline_along_random_walks() -> None:
    inline, process, eos = managers(rows=7)
    try:
        specs = [SO(json=SCHEMA), SO(regex=r"[0-9]{2,4}-[a-z]+"), SO(choice=["yes", "no way"])]
        params = [
            SamplingParams(structured_outputs=so).clone(all_stop_token_ids={eos}) for so in specs
        ]
        pairs = [(ready(inline, p), ready(process, p)) for p in params * 2]
        assert all(a.stop_token_ids == b.stop_token_ids == {eos} for a, b in pairs)
        rng = random.Random(0)
        shifts = torch.arange(32, dtype=torch.int32)
        for step in range(40):
            rows = [None, *pairs]  # a row without a grammar first
            a_mask = inline.bitmask([None, *(a for a, _ in pairs)])
            process.prefetch([None, *(b for _, b in pairs)])  # as the engine core does
            b_mask = process.bitmask([None, *(b for _, b in pairs)])
            assert a_mask is not None and b_mask is not None
            assert torch.equal(a_mask, b_mask), step
            for i, pair in enumerate(rows[1:], start=1):
                a, b = pair  # type: ignore[misc]
                if a.is_terminated():
                    continue
                allowed = ((a_mask[i, :, None] >> shifts) & 1).bool().flatten()
                token = rng.choice(allowed.nonzero().flatten().tolist())
                assert a.accept(token) and b.accept(token)
                assert a.is_terminated() == b.is_terminated()
        assert any(a.is_terminated() for a, _ in pairs)  # some walks reached the end
    finally:
        inline.shutdown()
        process.shutdown()


def test_refusal_is_reported_and_release_frees_the_matcher() -> None:
    inline, process, eos = managers(rows=2)
    inline.shutdown()
    try:
        params = SamplingParams(structured_outputs=SO(regex="ab")).clone(all_stop_token_ids={eos})
        g = ready(process, params)
        x = load_tokenizer(default_model_path()).convert_tokens_to_ids("x")
        assert g.accept(x)  # refused by the matcher, which hears of it with the next bitmask
        mask = process.bitmask([g])
        assert mask is not None and bool((mask[0] == -1).all())  # its row allows everything
        assert g.error is not None and "no token" in g.error
        g.release()
        other = ready(process, params)
        assert process.bitmask([other]) is not None and other.error is None
    finally:
        process.shutdown()


def test_a_dead_grammar_process_is_a_clear_error_and_shutdown_leaves_none() -> None:
    inline, process, eos = managers(rows=2)
    inline.shutdown()
    params = SamplingParams(structured_outputs=SO(regex="[a-z]+")).clone(all_stop_token_ids={eos})
    g = ready(process, params)
    proc = process._channel._proc  # type: ignore[union-attr]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(5)
    with pytest.raises(RuntimeError, match="grammar process exited"):
        process.bitmask([g])
    process.shutdown()
    survivor = StructuredOutputManager(
        default_model_path(), 64, max_rows=1, pin_memory=False, matchers="process"
    )
    child = survivor._channel._proc  # type: ignore[union-attr]
    survivor.shutdown()
    assert child.poll() == 0  # ended, on the stop message
