"""Each benchmark script runs on CPU with tiny shapes and writes its JSON (no timing checks)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"

CASES = {
    "latency": [
        "--shape",
        "tiny",
        "--levels",
        "0",
        "--batch-sizes",
        "1,2",
        "--decode-steps",
        "2",
        "--prefill-lens",
        "32",
        "--peer",
        "--no-peer-compile",
    ],
    "throughput": [
        "--shape",
        "tiny",
        "--workload",
        "random",
        "--num-prompts",
        "4",
        "--input-len",
        "8",
        "--output-len",
        "4",
        "--repeats",
        "2",
        "--step-timeline",
    ],
    "startup": ["--shape", "tiny", "-O", "0"],
    "structured_output": [
        "--shape",
        "tiny",
        "--batch",
        "4",
        "--input-len",
        "8",
        "--output-len",
        "6",
        "--large-schema-fields",
        "5",
        "--engine-args",
        '{"enforce_eager": true}',
    ],
    "structured_output:host": ["--host-only", "--batch", "3", "--output-len", "4"],
    "step_kernels": ["--shape", "tiny", "--steps", "2"],
    "spec_decode": [
        "--shape",
        "tiny",
        "--batch-sizes",
        "1",
        "--accept-probs",
        "0,1",
        "--max-tokens",
        "8",
        "--repeats",
        "1",
        "-O",
        "0",
    ],
    "spec_decode:draft_model": [
        "--workload",
        "draft_model",
        "--shape",
        "tiny",
        "--draft-shape",
        "tiny-draft",
        "--batch-sizes",
        "1",
        "--accept-probs",
        "0,1",
        "--max-tokens",
        "8",
        "--repeats",
        "1",
        "-O",
        "0",
    ],
    "spec_decode:eagle3": [
        "--workload",
        "eagle3",
        "--shape",
        "tiny",
        "--batch-sizes",
        "1",
        "--accept-probs",
        "0",
        "--max-tokens",
        "8",
        "--repeats",
        "1",
        "-O",
        "0",
    ],
    "passes": [
        "--shape",
        "tiny",
        "-O",
        "0",
        "--only",
        "gemm_merge",
        "--batch-sizes",
        "1",
        "--decode-steps",
        "2",
        "--prefill-lens",
        "32",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_smoke(script: str) -> None:
    name = script.split(":")[0]  # "script:variant" runs script with that variant's arguments
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), *CASES[script]],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("config:")  # configuration first
    assert "failed" not in result.stdout, result.stdout
    path = re.search(r"results: (\S+\.json)", result.stdout).group(1)
    payload = json.loads(Path(path).read_text())
    assert payload["env"]["torch"] and payload["config"]
    if "rows" in payload:  # step_kernels.py: the step's time, grouped by kernel (CPU: by aten op)
        assert payload["rows"] and payload["busy_us_per_step"] > 0
        Path(payload["trace"]).unlink()
    if script == "throughput":  # --repeats 2: both timed runs recorded, the median reported
        ours = payload["results"]["compiled-llm"]
        assert len(ours["runs_s"]) == 2 and min(ours["runs_s"]) <= ours["seconds"]
        # The last run's steps: every prompt token computed once (fresh ids: no prefix hits),
        # and every output token but each request's last fed back once; each step but the last
        # charged to a kind.
        timeline = ours["step_timeline"]
        steps = timeline["steps"]
        assert sum(p for p, _, _ in steps) == ours["input_tokens"]  # token counts: last run's
        fed_back = ours["output_tokens"] - ours["requests"]
        assert sum(t for _, t, _ in steps) == ours["input_tokens"] + fed_back
        assert sum(k["steps"] for k in timeline["kinds"].values()) == len(steps) - 1
    if script == "startup":
        for run in payload["runs"].values():  # no stage is counted twice
            assert min(run["stages"].values()) >= 0 and run["stages"]["other"] >= 0
    Path(path).unlink()


@pytest.mark.parametrize(
    "script", ["attention", "serve", *sorted({c.split(":")[0] for c in CASES})]
)
def test_benchmark_help(script: str) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{script}.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "usage" in result.stdout


@pytest.mark.parametrize(
    "shape", ["llama-3.1-8b", "llama-3.1-70b", "qwen3-8b", "qwen3-30b-a3b", "mixtral-8x7b"]
)
def test_weight_bytes_are_the_models_parameters(shape: str) -> None:
    """The roofline's byte counts against the native model built from the shape (on the meta
    device): all its parameters, and at batch 1 all but the untied embedding table with each
    MoE layer's stacked experts counted top_k / num_experts (the active parameters); at a
    batch large enough to touch every expert, all experts."""
    from transformers import AutoConfig

    from compiled_llm.models.registry import get_model_class

    sys.path.insert(0, str(BENCHMARKS))
    from shapes import SHAPES, shape_folder, weight_bytes

    config = AutoConfig.from_pretrained(shape_folder(shape))
    with torch.device("meta"):
        model = get_model_class(config)(config, 16, None)
    c = SHAPES[shape]
    num_experts = c.get("num_experts") or c.get("num_local_experts") or 1
    active = c.get("num_experts_per_tok", 1) / num_experts
    total = read = every_expert = 0.0
    for name, param in model.named_parameters():
        n = param.numel()
        total += n
        if "embed_tokens" in name and not c["tie_word_embeddings"]:
            continue
        read += n * active if ".experts." in name else n
        every_expert += n
    assert weight_bytes(shape) == (2 * total, round(2 * read))
    assert weight_bytes(shape, batch=10**6)[1] == 2 * every_expert
    if num_experts > 1:
        assert weight_bytes(shape, batch=8)[1] > weight_bytes(shape)[1]


def test_step_kernels_charges_gpu_gaps_to_their_launch() -> None:
    """A synthetic CUDA trace: a kernel, then a pageable copy whose runtime call ran inside an
    aten op 60 us after the kernel ended (a long gap), then a kernel 8 us later (short)."""
    sys.path.insert(0, str(BENCHMARKS))
    from step_kernels import host_side

    def ev(cat: str, name: str, ts: float, dur: float, tid: int = 1, **args: object) -> dict:
        return {"cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "args": args}

    events = [
        ev("cuda_runtime", "cudaGraphLaunch", -50, 5, correlation=5),
        ev("kernel", "k1", 0, 100, tid=7, correlation=5),
        ev("cpu_op", "aten::copy_", 100, 50),
        ev("cpu_op", "aten::empty", 101, 2),  # nested: not top level
        ev("cpu_op", "aten::copy_", 105, 1, tid=2),  # another thread
        ev("cuda_runtime", "cudaMemcpyAsync", 110, 40, correlation=7),
        ev("gpu_memcpy", "Memcpy HtoD (Pageable -> Device)", 160, 2, tid=7, correlation=7),
        ev("cuda_runtime", "cudaLaunchKernel", 155, 3, correlation=8),
        ev("kernel", "k2", 170, 10, tid=7, correlation=8),
    ]
    out = host_side(events, steps=2)
    assert out["long_gaps_by_launch"] == [
        {"name": "cudaMemcpyAsync in aten::copy_", "calls_per_step": 0.5, "us_per_step": 30.0}
    ]
    assert out["copies"] == [
        {"name": "Memcpy HtoD (Pageable -> Device)", "calls_per_step": 0.5, "us_per_step": 1.0}
    ]
    assert [r["name"] for r in out["runtime_calls"]] == [
        "cudaMemcpyAsync",
        "cudaGraphLaunch",
        "cudaLaunchKernel",
    ]
