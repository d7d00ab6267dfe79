"""The compiler on CPU (-O1): outputs equal eager, no recompiles, identical layers compile once,
warm starts reuse the compile cache and skip Dynamo, corrupt entries are rebuilt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from compiled_llm import LLM, SamplingParams
from tests.conftest import make_tiny_model

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [
    "Compiled and eager",
    "must agree token for token on every prompt, long or short",
    "x",
    "A mixed batch of prefills and decodes " * 4,
]


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def compiled_llm(path, tmp_path: Path | None = None, **kwargs) -> LLM:
    if tmp_path is not None:
        kwargs["compile_cache_dir"] = str(tmp_path)
    return LLM(str(path), max_model_len=256, compilation_level=1, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_compiled_equals_eager(kind: str, tiny_models) -> None:
    path = tiny_models(kind)
    eager = LLM(str(path), max_model_len=256, enforce_eager=True)
    compiled = compiled_llm(path)
    assert compiled.engine.core.runner.compiled is not None
    stats = compiled.engine.core.runner.compiled.stats
    assert stats.num_pieces == 3 and stats.num_unique == 3  # first, one middle layer, last
    assert token_ids(compiled.generate(PROMPTS, GREEDY, use_tqdm=False)) == token_ids(
        eager.generate(PROMPTS, GREEDY, use_tqdm=False)
    )
    # one request alone: every decode step is a 1-token batch
    assert token_ids(compiled.generate(PROMPTS[1], GREEDY, use_tqdm=False)) == token_ids(
        eager.generate(PROMPTS[1], GREEDY, use_tqdm=False)
    )


@pytest.mark.slow
def test_no_recompiles_across_batch_shapes(tiny_models) -> None:
    llm = compiled_llm(tiny_models("llama"))
    graphs_before = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        engine = llm.engine
        # 1..64 tokens per step: single decodes, growing decode batches, mixed steps.
        for n in (1, 2, 3, 5, 8, 13, 21, 34, 64):
            llm.generate([f"p{i} " * (1 + i % 5) for i in range(n)], GREEDY, use_tqdm=False)
        engine.add_request("long", "prefill while others decode " * 8, GREEDY)
        for i in range(4):
            engine.add_request(f"d{i}", "decode", GREEDY)
            engine.step()
        while engine.has_unfinished_requests():
            engine.step()
    assert counters["stats"]["unique_graphs"] == graphs_before
    assert not counters["recompiles"]


_COMPILE_SECONDS = """
import json, sys
from compiled_llm import LLM
llm = LLM(sys.argv[1], max_model_len=256, compilation_level=1, compile_cache_dir=sys.argv[2])
s = llm.engine.core.runner.compiled.stats
print(json.dumps({"unique": s.num_unique, "seconds": s.trace_s + s.passes_s + s.inductor_s}))
"""


@pytest.mark.slow
def test_identical_layers_compile_once(tmp_path: Path, embedded_tokenizer_dir) -> None:
    """A deeper model compiles no more pieces: 8 layers compiled cold in a fresh process give
    Inductor the three unique pieces any depth has (before the first attention, between two,
    after the last), not one per layer (time is the benchmarks' business)."""
    deep = make_tiny_model("llama", tmp_path / "l8", embedded_tokenizer_dir, num_hidden_layers=8)

    def unique_pieces(path: Path, name: str) -> int:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / f"inductor-{name}"))
        result = subprocess.run(
            [sys.executable, "-c", _COMPILE_SECONDS, str(path), str(tmp_path / name)],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return int(json.loads(result.stdout.strip().splitlines()[-1])["unique"])

    assert unique_pieces(deep, "deep") == 3


@pytest.mark.slow
def test_warm_start_skips_dynamo_and_matches(tiny_models, tmp_path: Path) -> None:
    path = tiny_models("qwen3")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")
    try:
        cold = compiled_llm(path, tmp_path / "cc")
        cold_out = token_ids(cold.generate(PROMPTS, GREEDY, use_tqdm=False))
        del cold
        torch._dynamo.reset()
        graphs = counters["stats"]["unique_graphs"]
        warm = compiled_llm(path, tmp_path / "cc")
    finally:
        del os.environ["TORCHINDUCTOR_CACHE_DIR"]
    stats = warm.engine.core.runner.compiled.stats
    assert stats.warm and stats.dynamo_skipped and stats.inductor_s == 0.0
    assert stats.num_pieces == 3 and stats.num_unique == 3
    assert token_ids(warm.generate(PROMPTS, GREEDY, use_tqdm=False)) == cold_out
    assert counters["stats"]["unique_graphs"] == graphs  # Dynamo never traced
    # gemm_merge's layout (q/k/v rows back to back in one storage) was restored on the fresh model
    attn = warm.engine.core.runner.model.model.layers[0].self_attn
    storages = {p.untyped_storage().data_ptr() for p in (attn.q_proj.weight, attn.k_proj.weight)}
    assert len(storages) == 1


def _piece_entries(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.bin") if p.stem != "graph")


@pytest.mark.slow
def test_corrupt_cache_entry_is_rebuilt(tiny_models, tmp_path: Path) -> None:
    path = tiny_models("llama")
    reference = token_ids(compiled_llm(path, tmp_path).generate(PROMPTS, GREEDY, use_tqdm=False))
    entries = _piece_entries(tmp_path)
    assert len(entries) == 3
    entries[0].write_bytes(b"garbage" + entries[0].read_bytes()[7:])
    entries[1].write_bytes(b"")
    torch._dynamo.reset()
    llm = compiled_llm(path, tmp_path)
    cache = llm.engine.core.runner.compiled.cache
    assert cache is not None and cache.rebuilt == 2 and cache.hits == 1
    assert not llm.engine.core.runner.compiled.stats.dynamo_skipped  # traced to rebuild them
    assert token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference
    # rebuilt entries are valid again
    torch._dynamo.reset()
    again = compiled_llm(path, tmp_path).engine.core.runner.compiled
    assert again.cache is not None and again.cache.hits == 3 and again.cache.rebuilt == 0
    assert again.stats.dynamo_skipped


@pytest.mark.slow
def test_corrupt_saved_graph_is_rebuilt(tiny_models, tmp_path: Path) -> None:
    path = tiny_models("llama")
    reference = token_ids(compiled_llm(path, tmp_path).generate(PROMPTS, GREEDY, use_tqdm=False))
    (graph,) = tmp_path.rglob("graph.bin")
    graph.write_bytes(graph.read_bytes()[:-10])
    torch._dynamo.reset()
    llm = compiled_llm(path, tmp_path)
    compiled = llm.engine.core.runner.compiled
    assert compiled.cache is not None and compiled.cache.rebuilt == 1
    assert compiled.stats.warm and not compiled.stats.dynamo_skipped  # pieces from the cache
    assert token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference
    torch._dynamo.reset()
    assert compiled_llm(path, tmp_path).engine.core.runner.compiled.stats.dynamo_skipped


def test_cache_can_be_disabled(tiny_models, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("COMPILED_LLM_DISABLE_COMPILE_CACHE", "1")
    llm = compiled_llm(tiny_models("llama"), tmp_path)
    assert llm.engine.core.runner.compiled.cache is None
    assert not list(tmp_path.rglob("*.bin"))
