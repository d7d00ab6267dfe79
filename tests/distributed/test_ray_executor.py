"""`distributed_executor_backend="ray"` on CPU (gloo, 2 ranks: rank 0 in this process, rank 1 a
Ray actor of a local 2-CPU Ray cluster): greedy outputs equal the unsharded engine's; a killed
actor ends the engine with Ray's actor-death error naming rank 1 and leaves nothing placed;
without ray installed the engine refuses before reading the model. The tiny Llama, the prompts
(chunked prefill, a prefix-cache hit) and the engine settings are test_tp_engine.py's."""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from compiled_llm import LLM
from compiled_llm.config import EngineArgs
from compiled_llm.engine import tp_executor
from compiled_llm.engine.tp_executor import WorkerFailed
from tests.distributed import test_tp_engine as tp

llama = tp.llama  # the module-scoped tiny Llama fixture

requires_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="ray is not installed (compiled-llm[ray])"
)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs (one bundle per rank), shut down after the module."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def cpus_free(ray, want: float, timeout: float = 10.0) -> bool:
    """Whether every CPU of the cluster is back (no actor, no placement group left)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0.0) == want:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
@requires_ray
def test_ray_tp2_equals_tp1_then_a_killed_actor_ends_it(llama: Path, ray_cluster) -> None:
    from compiled_llm.engine.ray_executor import RayWorkers

    ray = ray_cluster
    single = LLM(str(llama), **tp.ENGINE)
    expected = tp.generate(single, tp.PROMPTS)
    del single

    llm = LLM(str(llama), tensor_parallel_size=2, distributed_executor_backend="ray", **tp.ENGINE)
    try:
        workers = llm.engine.core.runner.workers
        assert isinstance(workers, RayWorkers)
        assert ray.available_resources().get("CPU", 0.0) == 0.0  # both bundles placed
        assert tp.generate(llm, tp.PROMPTS[:2]) == expected[:2]
        outs = llm.generate([{"prompt_token_ids": tp.PROMPTS[2]}], tp.GREEDY, use_tqdm=False)
        assert outs[0].outputs[0].token_ids == expected[2]
        assert outs[0].num_cached_tokens == 32

        # The actor's process dies mid-run: the next step fails with Ray's error and the rank.
        _, pid, _ = workers.info[0]
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(
            WorkerFailed, match=rf"(?s)rank 1 \(Ray actor \w+, pid {pid} on .*ActorDiedError"
        ):
            tp.generate(llm, tp.PROMPTS[:1])
        with pytest.raises(WorkerFailed, match="rank 1"):
            tp.generate(llm, tp.PROMPTS[:1])
        with pytest.raises(WorkerFailed, match="rank 1"):
            llm.engine.core.check_health()
        assert cpus_free(ray, 2.0)  # the placement group is gone
    finally:
        llm.engine.core.shutdown()
    assert cpus_free(ray, 2.0)
    assert ray.is_initialized()  # the engine did not start Ray, so it leaves it running


@pytest.mark.slow
@requires_ray
def test_ray_actor_failing_at_load_ends_the_start(llama: Path, ray_cluster, monkeypatch) -> None:
    """The actor's checkpoint folder is gone (rank 0's is not): the start raises the actor's
    own traceback with its rank, and nothing stays placed."""
    import dataclasses

    import torch

    from compiled_llm.engine import ray_executor

    def missing_weights(config, rank, device=None):
        config = tp_executor.rank_config(config, rank, device)
        mc = dataclasses.replace(config.model_config, model="/nonexistent/checkpoint")
        return dataclasses.replace(config, model_config=mc)

    monkeypatch.setattr(ray_executor, "rank_config", missing_weights)
    with pytest.raises(
        WorkerFailed, match=r"(?s)during start-up: rank 1 \(Ray actor .*no \*\.safetensors"
    ):
        LLM(str(llama), tensor_parallel_size=2, distributed_executor_backend="ray", **tp.ENGINE)
    assert cpus_free(ray_cluster, 2.0)
    assert not torch.distributed.is_initialized()  # a later engine can start


def test_without_ray_the_engine_refuses_before_reading_the_model(llama: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ValueError, match=r"pip install 'compiled-llm\[ray\]'"):
        EngineArgs(
            model="/no/such/model", tensor_parallel_size=2, distributed_executor_backend="ray"
        )
    with pytest.raises(ValueError, match="distributed_executor_backend='ray' needs Ray"):
        LLM(str(llama), tensor_parallel_size=2, distributed_executor_backend="ray", **tp.ENGINE)
    # one rank has no workers: nothing needs Ray
    EngineArgs(model=str(llama), distributed_executor_backend="ray")


def test_flag_and_refusal() -> None:
    from compiled_llm.cli import build_parser
    from compiled_llm.cli.args import engine_kwargs

    parser = build_parser()
    args = parser.parse_args(
        ["generate", "hi", "-tp", "2", "--distributed-executor-backend", "ray"]
    )
    assert engine_kwargs(args)["distributed_executor_backend"] == "ray"
    default = engine_kwargs(parser.parse_args(["generate", "hi"]))
    assert default["distributed_executor_backend"] == "mp"
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "hi", "--distributed-executor-backend", "mpi"])
    with pytest.raises(ValueError, match="distributed_executor_backend must be mp or ray"):
        EngineArgs(model="x", distributed_executor_backend="mpi")
