"""`compile_dump_dir` on a warm compile cache still dumps every pass's graphs: a start asked for
dumps compiles without the compile and Inductor caches."""

from __future__ import annotations

from pathlib import Path

import pytest

from compiled_llm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.mark.slow
def test_dumps_are_written_on_a_warm_cache(tiny_models, tmp_path: Path) -> None:
    model = str(tiny_models("llama"))
    cold = LLM(model, max_model_len=128, compilation_level=1)  # fills the compile cache
    expected = cold.generate("Hello there", GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    dumps = tmp_path / "dumps"
    dumped = LLM(model, max_model_len=128, compilation_level=1, compile_dump_dir=str(dumps))
    names = {p.name for p in dumps.rglob("*") if p.is_file()}
    for pass_name in ("attention_lowering", "gemm_merge", "noop_elimination"):  # graph, post-grad
        assert any(pass_name in n and "before" in n for n in names), (pass_name, sorted(names))
        assert any(pass_name in n and "after" in n for n in names), pass_name
    got = dumped.generate("Hello there", GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert got == expected
