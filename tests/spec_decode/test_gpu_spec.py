"""On CUDA at -O2: n-gram, draft-model and EAGLE-3 speculation give the greedy tokens of the same engine
without it (up to fp16 near-ties, `assert_greedy_close`), with drafts accepted; verification
steps (up to k + 1 query tokens a request) replay the full verification graphs on both backends
and steps without drafts the full decode graphs."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch

from compiled_llm import LLM, SamplingParams
from tests.conftest import GPU_SHAPE, assert_greedy_close, backend_available, tokens
from tests.spec_decode.conftest import GPU_LAYER_SCALE, VOCAB, build_cycle_model, chain

pytestmark = pytest.mark.gpu

_rng = random.Random(0)
PROMPTS = [
    {"prompt_token_ids": chain(17, 40) + [17]},
    {"prompt_token_ids": chain(5, 24) + [_rng.randrange(VOCAB) for _ in range(9)] + [5]},
    {"prompt_token_ids": [_rng.randrange(VOCAB) for _ in range(20)]},
]
GREEDY = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, logprobs=5)
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1}


@pytest.fixture(scope="module")
def gpu_cycle_model(tmp_path_factory: pytest.TempPathFactory, embedded_tokenizer_dir: Path):
    return build_cycle_model(
        tmp_path_factory.mktemp("gpu-cycle"),
        embedded_tokenizer_dir,
        layer_scale=GPU_LAYER_SCALE,
        **GPU_SHAPE,
    )


def assert_verification_graphs(graphs, backend: str) -> None:  # noqa: ANN001
    """Both GPU backends' attention (`CudaGraphSupport.ALWAYS`) has verification batches replayed
    in full graphs."""
    assert graphs.verify_sizes, backend
    assert graphs.verify_replays > 0, backend


def engine_args(backend: str) -> dict:
    """The engines both tests compare: -O2 (CUDA graphs) with `backend`, float16."""
    return dict(
        dtype="float16",
        attention_backend=backend,
        compilation_level=2,
        max_num_seqs=8,
        max_model_len=512,
        skip_tokenizer_init=True,
        gpu_memory_utilization=0.3,
    )


@pytest.mark.parametrize("backend", ["triton", "flashinfer"])
def test_ngram_at_o2_matches_no_speculation(gpu_cycle_model, backend) -> None:
    if not backend_available(backend):
        pytest.skip(f"{backend} not installed")
    common = engine_args(backend)
    plain = LLM(str(gpu_cycle_model), **common)
    expected = tokens(plain.generate(PROMPTS, GREEDY, use_tqdm=False))
    alone = tokens(plain.generate(PROMPTS[2:], GREEDY, use_tqdm=False))
    del plain
    torch.cuda.empty_cache()
    llm = LLM(str(gpu_cycle_model), speculative_config=NGRAM, **common)
    graphs = llm.engine.core.runner.graphs
    assert graphs is not None
    free = llm.engine.num_free_blocks
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert_greedy_close(expected, tokens(outs))
    m = outs[0].metrics.spec_decode
    assert m is not None and m.num_accepted_draft_tokens > 0
    assert graphs.piecewise_replays > 0  # prefill
    assert_verification_graphs(graphs, backend)
    # alone, a request that finds no drafts decodes with the full decode graphs
    full_before = graphs.full_replays
    assert_greedy_close(alone, tokens(llm.generate(PROMPTS[2:], GREEDY, use_tqdm=False)))
    assert graphs.full_replays > full_before
    assert llm.engine.num_free_blocks == free


@pytest.fixture(scope="module")
def gpu_small_draft(tmp_path_factory: pytest.TempPathFactory, embedded_tokenizer_dir: Path):
    return build_cycle_model(
        tmp_path_factory.mktemp("gpu-cycle-draft"),
        embedded_tokenizer_dir,
        layer_scale=GPU_LAYER_SCALE,
        **{**GPU_SHAPE, "num_hidden_layers": 1},
    )


@pytest.mark.parametrize("backend", ["triton", "flashinfer"])
def test_draft_model_at_o2_matches_no_speculation(
    gpu_cycle_model, gpu_small_draft, backend
) -> None:
    """A one-layer draft at -O2: compiled, with its own piecewise and full decode graphs (the
    draft steps after the first are uniform decodes and replay its full graphs), its KV cache
    beside the target's with as many blocks; greedy output as without speculation."""
    if not backend_available(backend):
        pytest.skip(f"{backend} not installed")
    common = engine_args(backend)
    plain = LLM(str(gpu_cycle_model), **common)
    expected = tokens(plain.generate(PROMPTS, GREEDY, use_tqdm=False))
    del plain
    torch.cuda.empty_cache()
    spec = {"method": "draft_model", "model": str(gpu_small_draft), "num_speculative_tokens": 4}
    llm = LLM(str(gpu_cycle_model), speculative_config=spec, **common)
    runner = llm.engine.core.runner
    draft = runner.draft
    assert draft is not None and draft.graphs is not None and draft.compiled is not None
    assert draft.kv_caches[0].shape[0] == runner.kv_caches[0].shape[0]
    free = llm.engine.num_free_blocks
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert_greedy_close(expected, tokens(outs))
    m = outs[0].metrics.spec_decode
    assert m is not None and m.num_accepted_draft_tokens > 0
    assert draft.graphs.full_replays > 0 and draft.graphs.piecewise_replays > 0
    assert runner.graphs is not None
    assert_verification_graphs(runner.graphs, backend)
    assert llm.engine.num_free_blocks == free
    # Seeded sampling under the default rejection_sampling (q rows kept on the device, the
    # rejection sampler in the verification step): the same tokens on a second run, with
    # drafts accepted.
    seeded = SamplingParams(temperature=0.8, seed=3, max_tokens=48, ignore_eos=True)
    first = llm.generate(PROMPTS, seeded, use_tqdm=False)
    assert tokens(first) == tokens(llm.generate(PROMPTS, seeded, use_tqdm=False))
    assert (
        sum(o.metrics.spec_decode.num_accepted_draft_tokens for o in first if o.metrics.spec_decode)
        > 0
    )


@pytest.fixture(scope="module")
def gpu_eagle3_head(tmp_path_factory: pytest.TempPathFactory, gpu_cycle_model: Path) -> Path:
    from tests.spec_decode.conftest import permutation
    from tests.spec_decode.eagle3_head import write_head

    return write_head(tmp_path_factory.mktemp("gpu-eagle3"), gpu_cycle_model, follow=permutation())


@pytest.mark.parametrize("backend", ["triton", "flashinfer"])
def test_eagle3_at_o2_matches_no_speculation(gpu_cycle_model, gpu_eagle3_head, backend) -> None:
    """An EAGLE-3 head (published layout, reduced draft vocabulary, the cycle model's follower)
    at -O2: the target's forward with its layer taps and the head are compiled and CUDA-graphed
    (the head's steps after the first replay its full graphs); greedy output as without
    speculation, first drafts mostly accepted."""
    if not backend_available(backend):
        pytest.skip(f"{backend} not installed")
    common = engine_args(backend)
    plain = LLM(str(gpu_cycle_model), **common)
    expected = tokens(plain.generate(PROMPTS, GREEDY, use_tqdm=False))
    del plain
    torch.cuda.empty_cache()
    spec = {"method": "eagle3", "model": str(gpu_eagle3_head), "num_speculative_tokens": 3}
    llm = LLM(str(gpu_cycle_model), speculative_config=spec, **common)
    runner = llm.engine.core.runner
    head = runner.draft
    assert head is not None and head.graphs is not None and runner.graphs is not None
    assert runner.hidden_cache is not None
    assert runner.hidden_cache.shape[0] == runner.kv_caches[0].shape[0] * runner.block_size
    free = llm.engine.num_free_blocks
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert_greedy_close(expected, tokens(outs))
    m = outs[0].metrics.spec_decode
    assert m is not None and m.num_accepted_draft_tokens > 0
    assert head.graphs.full_replays > 0 and head.graphs.piecewise_replays > 0
    assert runner.graphs.piecewise_replays > 0
    assert_verification_graphs(runner.graphs, backend)
    assert llm.engine.num_free_blocks == free


def test_structured_outputs_with_ngram_at_o2(gpu_cycle_model) -> None:
    """Grammar rows verifying drafts on CUDA (-O2, the matchers in their own process, as by
    default there): the greedy tokens of the same engine without speculation, up to fp16 near
    ties; every text a match of the regex."""
    from compiled_llm.sampling_params import StructuredOutputsParams

    backend = "flashinfer" if backend_available("flashinfer") else "triton"
    common = engine_args(backend) | {"skip_tokenizer_init": False}
    regex = "[!-O]{0,30}"  # with the embedded tokenizer: tokens 17-63 (see test_spec_engine.py)
    so = StructuredOutputsParams(regex=regex)
    params = SamplingParams(temperature=0, max_tokens=48, logprobs=5, structured_outputs=so)
    plain = LLM(str(gpu_cycle_model), **common)
    expected = tokens(plain.generate(PROMPTS, params, use_tqdm=False))
    del plain
    torch.cuda.empty_cache()
    llm = LLM(str(gpu_cycle_model), speculative_config=NGRAM, **common)
    assert llm.engine.core.config.structured_outputs_config.matchers == "process"
    free = llm.engine.num_free_blocks
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    diverged = 0
    assert all(re.fullmatch(regex, o.outputs[0].text) for o in outs), [
        o.outputs[0].text for o in outs
    ]
    for (ref_ids, ref_lps), (ids, lps) in zip(expected, tokens(outs)):
        for pos, (a, b) in enumerate(zip(ref_ids, ids)):
            if a != b:  # a near tie; the rest follows another prefix
                assert a in lps[pos] and b in ref_lps[pos], (pos, a, b)
                diverged += 1
                break
        else:
            assert len(ids) == len(ref_ids)
    assert diverged <= 1
    metrics = [o.metrics.spec_decode for o in outs if o.metrics.spec_decode is not None]
    assert sum(m.num_draft_tokens for m in metrics) > 0  # drafts verified under the grammar
    assert llm.engine.num_free_blocks == free
    llm.engine.core.shutdown()
