"""On CUDA: every attention backend, compiled with CUDA graphs (-O2), gives the same greedy
tokens as the eager torch-reference engine; graph replays are counted."""

from __future__ import annotations

import pytest
import torch

from compiled_llm import LLM, SamplingParams
from tests.conftest import assert_greedy_close, backend_available, tokens

pytestmark = pytest.mark.gpu

PROMPTS = [
    "def main():",
    "import torch",
    "The scheduler packs decodes and prefills",
    "x = 1",
    "class Request:\n    def __init__(self):",
    "assert tokens ==",
    "for i in range(10):",
    "return self.engine.step()" * 3,
]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=5)


@pytest.fixture(scope="module")
def reference(gpu_models) -> dict[str, list[list[int]]]:
    out = {}
    for kind, path in gpu_models.items():
        llm = LLM(str(path), dtype="float16", attention_backend="torch", enforce_eager=True)
        out[kind] = tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
        del llm
    return out


@pytest.mark.parametrize("backend", ["triton", "flashinfer"])
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_backend_with_cuda_graphs_matches_reference(kind, backend, gpu_models, reference):
    if not backend_available(backend):
        pytest.skip(f"{backend} not installed")
    llm = LLM(
        str(gpu_models[kind]),
        dtype="float16",
        attention_backend=backend,
        compilation_level=2,
        max_num_seqs=16,
        cudagraph_capture_sizes=[1, 2, 4, 8, 16, 32, 64, 128, 256],
    )
    runner = llm.engine.core.runner
    assert runner.graphs is not None and runner.graphs.decode_sizes  # decode graphs captured
    got = tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    assert_greedy_close(reference[kind], got)
    assert runner.graphs.full_replays > 0
    assert runner.graphs.piecewise_replays > 0  # prefill steps of <= 256 tokens
    # alone: 1-token decode graphs
    single = tokens(llm.generate(PROMPTS[2], GREEDY, use_tqdm=False))
    assert_greedy_close([reference[kind][2]], single)


def test_o2_equals_o0_same_backend(gpu_models):
    """Default capture sizes: 24 decoding requests replay the size-24 decode graph, a size
    the coarser piecewise list does not have (the 24 prompts' prefill runs piecewise)."""
    backend = "flashinfer" if backend_available("flashinfer") else "triton"
    path = str(gpu_models["llama"])
    prompts = PROMPTS * 3
    eager = LLM(path, dtype="float16", attention_backend=backend, enforce_eager=True)
    expected = tokens(eager.generate(prompts, GREEDY, use_tqdm=False))
    del eager
    torch.cuda.empty_cache()
    compiled = LLM(path, dtype="float16", attention_backend=backend, max_num_seqs=24)
    assert compiled.engine.config.compilation_config.level == 2  # the CUDA default
    graphs = compiled.engine.core.runner.graphs
    assert graphs.padding(24, 24, 1) == (24, 24) and 24 not in graphs.piecewise_sizes
    assert_greedy_close(expected, tokens(compiled.generate(prompts, GREEDY, use_tqdm=False)))
    assert graphs.full_replays > 0 and graphs.piecewise_replays > 0


def test_o2_warm_start_skips_dynamo_and_matches(gpu_models, tmp_path):
    """A second -O2 start calls the saved split graph (no Dynamo) under CUDA graphs."""
    backend = "flashinfer" if backend_available("flashinfer") else "triton"
    kwargs = dict(
        dtype="float16",
        attention_backend=backend,
        max_num_seqs=16,
        compile_cache_dir=str(tmp_path),
        cudagraph_capture_sizes=[1, 2, 4, 8, 16, 32, 64, 128, 256],
    )
    cold = LLM(str(gpu_models["llama"]), **kwargs)
    assert not cold.engine.core.runner.compiled.stats.dynamo_skipped
    expected = tokens(cold.generate(PROMPTS, GREEDY, use_tqdm=False))
    del cold
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    warm = LLM(str(gpu_models["llama"]), **kwargs)
    runner = warm.engine.core.runner
    assert runner.compiled.stats.dynamo_skipped and runner.compiled.stats.warm
    assert tokens(warm.generate(PROMPTS, GREEDY, use_tqdm=False)) == expected
    assert runner.graphs.full_replays > 0 and runner.graphs.piecewise_replays > 0
