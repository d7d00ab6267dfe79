"""`tensor_parallel_size` as an engine option, on CPU (gloo, 2 ranks: rank 0 in this process,
rank 1 a worker process): greedy outputs equal the unsharded engine's and transformers' on a
tiny Llama (chunked prefill and prefix-cache hits included) and a tiny Qwen3-MoE; a worker
killed mid-run or failing at load ends the engine with an error naming its rank and leaves no
process; bad sizes are refused before anything starts. One engine per test, eager (the
compiled rank graphs are covered by test_tensor_parallel.py)."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from compiled_llm import LLM, SamplingParams
from compiled_llm.config import EngineArgs, _check_tensor_parallel
from compiled_llm.engine import tp_executor
from compiled_llm.engine.tp_executor import WorkerFailed
from tests.conftest import assert_greedy_close, make_tiny_model, tokens
from tests.distributed import tp_engine_worker
from tests.hf_reference import greedy_tokens, hf_greedy

MAX_TOKENS = 8
# Prompts of 5, 40 and 40 ids, the last two sharing their first 32 (two 16-token blocks): with
# max_num_batched_tokens=16 the long ones prefill in chunks, and the third hits the prefix cache.
PROMPTS = [
    [1, 5, 9, 200, 33],
    [1, *range(100, 139)],
    [1, *range(100, 131), *range(500, 508)],
]
ENGINE = dict(
    dtype="float32",
    max_model_len=128,
    enforce_eager=True,
    # 12 blocks of the Llama's 2 KV heads (2 layers x K and V x 16 tokens x 2 x 16 x 4 bytes)
    kv_cache_memory_bytes=12 * 8192,
    max_num_batched_tokens=16,
    max_num_seqs=4,
)
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)


def generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def workers_of(llm: LLM) -> list[Any]:
    return list(llm.engine.core.runner.workers.procs)


def assert_no_workers_left(procs: list[Any]) -> None:
    for p in procs:
        p.join(10)
        assert not p.is_alive(), p
    assert not [c for c in multiprocessing.active_children() if c.name.startswith("TPWorker")]


@pytest.fixture(scope="module")
def llama(tmp_path_factory, embedded_tokenizer_dir) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("tp-llama"), embedded_tokenizer_dir)


@pytest.mark.slow
def test_tp2_equals_tp1_and_hf_then_a_killed_worker_ends_it(llama: Path) -> None:
    """One TP=2 engine: greedy tokens equal transformers' and TP=1's (chunked prefill, then a
    prefix-cache hit); each rank holds half the KV heads; then rank 1 is killed mid-run."""
    expected = greedy_tokens(hf_greedy(llama, PROMPTS, MAX_TOKENS))
    single = LLM(str(llama), **ENGINE)
    assert generate(single, PROMPTS) == expected
    single_blocks = single.engine.core.num_blocks
    del single

    llm = LLM(str(llama), tensor_parallel_size=2, **ENGINE)
    procs = workers_of(llm)
    try:
        runner = llm.engine.core.runner
        assert runner.backend.spec.num_kv_heads == 1 and runner.backend.spec.num_heads == 2
        # the same KV budget holds twice the blocks of half the heads
        assert (single_blocks, llm.engine.core.num_blocks) == (12, 24)
        assert generate(llm, PROMPTS[:2]) == expected[:2]
        outs = llm.generate([{"prompt_token_ids": PROMPTS[2]}], GREEDY, use_tqdm=False)
        assert outs[0].outputs[0].token_ids == expected[2]
        assert outs[0].num_cached_tokens == 32  # two blocks of the second prompt's prefix

        # A worker dies mid-run: the next step fails with its rank, and so does every later one.
        pid = procs[0].pid
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerFailed, match=rf"rank 1 \(pid {pid}\) was killed by signal 9"):
            generate(llm, PROMPTS[:1])
        with pytest.raises(WorkerFailed, match="rank 1"):
            generate(llm, PROMPTS[:1])
        with pytest.raises(WorkerFailed, match="rank 1"):  # what the server polls when idle
            llm.engine.core.check_health()
        assert_no_workers_left(procs)
    finally:
        llm.engine.core.shutdown()
    assert_no_workers_left(procs)


@pytest.mark.slow
def test_tp2_moe_equals_hf(tmp_path: Path, embedded_tokenizer_dir: Path) -> None:
    """Qwen3-MoE (a dense layer between sparse ones): the experts' intermediate dim split."""
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    path = make_tiny_model(
        "qwen3_moe",
        tmp_path,
        embedded_tokenizer_dir,
        **moe,
        num_hidden_layers=3,
        mlp_only_layers=[1],
    )
    expected = greedy_tokens(hf_greedy(path, PROMPTS[:2], MAX_TOKENS))
    llm = LLM(str(path), tensor_parallel_size=2, **ENGINE)
    procs = workers_of(llm)
    try:
        assert generate(llm, PROMPTS[:2]) == expected
    finally:
        llm.engine.core.shutdown()
    assert_no_workers_left(procs)


@pytest.mark.slow
def test_worker_failing_at_load_ends_the_start(llama: Path, monkeypatch) -> None:
    monkeypatch.setattr(tp_executor, "worker_main", tp_engine_worker.worker_with_missing_weights)
    started = time.monotonic()
    with pytest.raises(WorkerFailed, match=r"(?s)during start-up: rank 1 .*no \*\.safetensors"):
        LLM(str(llama), tensor_parallel_size=2, **ENGINE)
    assert time.monotonic() - started < 120  # no collective waited for its timeout
    assert_no_workers_left([])
    assert not torch.distributed.is_initialized()  # a later engine can start


def test_worker_dying_before_the_rendezvous_ends_the_start(llama: Path, monkeypatch) -> None:
    """Rank 0 does not wait in the rendezvous for a worker that never comes."""
    monkeypatch.setattr(tp_executor, "worker_main", tp_engine_worker.worker_that_exits_at_once)
    with pytest.raises(WorkerFailed, match=r"rank 1 \(pid \d+\) exited with code 3 before joining"):
        LLM(str(llama), tensor_parallel_size=2, **ENGINE)
    assert_no_workers_left([])
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(tensor_parallel_size=0), "tensor_parallel_size must be an integer >= 1"),
        (dict(tensor_parallel_size=3), "tensor_parallel_size=3 does not divide"),
    ],
)
def test_bad_sizes_are_refused_before_anything_starts(llama: Path, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        LLM(str(llama), **{**ENGINE, **kwargs})
    assert_no_workers_left([])
    assert not torch.distributed.is_initialized()


def test_a_draft_model_with_tensor_parallelism_is_refused(llama: Path) -> None:
    """The draft model runs in rank 0's process only."""
    spec = {"method": "draft_model", "model": str(llama), "num_speculative_tokens": 2}
    with pytest.raises(ValueError, match="'draft_model' with tensor_parallel_size > 1"):
        LLM(str(llama), tensor_parallel_size=2, speculative_config=spec, **ENGINE)
    assert_no_workers_left([])


def test_rank_0s_own_refusal_at_start_is_raised_as_it_is(llama: Path) -> None:
    """Every rank finds the KV cache too small for max_model_len; the user sees the
    ValueError, not a worker failure."""
    with pytest.raises(ValueError, match="fewer than max_model_len=128"):
        LLM(str(llama), tensor_parallel_size=2, **{**ENGINE, "kv_cache_memory_bytes": 4096})
    assert_no_workers_left([])
    assert not torch.distributed.is_initialized()


def test_a_step_read_after_a_worker_died_is_refused() -> None:
    """On CUDA the monitor aborts NCCL when a worker dies, so the step in flight ends with
    meaningless sums: its result raises the failure instead of handing out tokens."""
    driver = SimpleNamespace(failure=None)
    assert tp_executor._CheckedStepHandle(driver, [], None).result().request_ids == []
    driver.failure = WorkerFailed("tensor-parallel worker rank 1 died")
    with pytest.raises(WorkerFailed, match="rank 1"):
        tp_executor._CheckedStepHandle(driver, [], None).result()


def test_more_ranks_than_gpus_are_refused(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    mc = SimpleNamespace(num_heads=8, num_kv_heads=8, model="/x", model_impl="native")
    _check_tensor_parallel(mc, 2, torch.device("cuda"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 needs GPUs 1\.\.2"):
        _check_tensor_parallel(mc, 2, torch.device("cuda", 1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"tensor_parallel_size=4 needs GPUs 0\.\.3"):
        _check_tensor_parallel(mc, 4, torch.device("cuda"))  # type: ignore[arg-type]


def test_flag_and_compile_cache_key(llama: Path) -> None:
    """`-tp 2` sets the field; each rank of each size compiles into its own cache entry."""
    from compiled_llm.cli import build_parser
    from compiled_llm.cli.args import engine_kwargs
    from compiled_llm.compilation.compiler import make_cache

    args = build_parser().parse_args(["generate", "hi", "-tp", "2"])
    assert engine_kwargs(args)["tensor_parallel_size"] == 2
    config = EngineArgs(model=str(llama), **ENGINE).create_config()
    pipeline = SimpleNamespace(uuid=lambda: "p")
    keys = set()
    for world, rank in ((1, 0), (2, 0), (2, 1)):
        pc = dataclasses.replace(config.parallel_config, tensor_parallel_size=world, rank=rank)
        c = dataclasses.replace(config, parallel_config=pc)
        keys.add(make_cache(c, pipeline, "torch").dir.name)  # type: ignore[arg-type]
    assert len(keys) == 3


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp2_equals_tp1_on_two_gpus_with_cuda_graphs(
    tmp_path: Path, embedded_tokenizer_dir
) -> None:
    """A random-weight small Llama (8 heads, 4 KV heads, 4 layers) saved to disk, at -O2 (full
    and piecewise CUDA graphs holding the NCCL all-reduces): TP=2 greedy tokens equal TP=1's
    (bfloat16: where the two pick differently the logits nearly tie, assert_greedy_close)."""
    import gc

    path = make_tiny_model(
        "llama",
        tmp_path,
        embedded_tokenizer_dir,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    engine = dict(
        dtype="bfloat16", compilation_level=2, max_model_len=256, kv_cache_memory_bytes=1 << 28
    )
    prompts = [[1, *range(10 + i, 10 + 7 * (i + 1))] for i in range(6)]
    params = SamplingParams(max_tokens=32, temperature=0, logprobs=5)

    def run(tp: int) -> tuple[list, Any]:
        llm = LLM(str(path), tensor_parallel_size=tp, **engine)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        graphs = llm.engine.core.runner.graphs
        replays = (graphs.full_replays, graphs.piecewise_replays) if graphs else (0, 0)
        llm.engine.core.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()
        return tokens(outs), replays

    single, _ = run(1)
    sharded, replays = run(2)
    assert replays[0] > 0 and replays[1] > 0  # decode in full graphs, prefill in pieces
    assert_greedy_close(single, sharded)
