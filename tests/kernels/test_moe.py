"""`compiled_llm::fused_experts` and the MoE routing.

The torch reference (the op on CPU, the oracle of the rest) against a float64 dense computation;
the routing against HF's own routers; the expert sort's blocks; the Triton kernels under
TRITON_INTERPRET=1 (in a subprocess: the variable must be set before triton is imported) against
the reference in float32 and float16 (the interpreter multiplies bfloat16 tiles as raw integers,
so bfloat16 is checked on CUDA only); and on CUDA at Qwen3-30B-A3B and Mixtral-8x7B expert
shapes in bfloat16, eager and replayed from a CUDA graph.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import compiled_llm.kernels  # noqa: F401
from compiled_llm.layers.moe import experts_reference, select_experts

ops = torch.ops.compiled_llm
ROOT = Path(__file__).resolve().parents[2]


def case(
    tokens: int,
    experts: int,
    top_k: int,
    hidden: int,
    inter: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    skew: bool = False,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random inputs scaled so each GEMM's outputs are O(1); `skew` sends every token to
    expert 0 first (one expert with many rows, many with none)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device)

    x = randn(tokens, hidden)
    w13 = randn(experts, 2 * inter, hidden) / hidden**0.5
    w2 = randn(experts, hidden, inter) / inter**0.5
    logits = randn(tokens, experts)
    if skew:
        logits[:, 0] += 10.0
    weights, ids = select_experts(logits, top_k, renormalize=True)
    return {
        "hidden": x.to(dtype),
        "w13": w13.to(dtype),
        "w2": w2.to(dtype),
        "topk_weights": weights,
        "topk_ids": ids,
    }


def upcast(c: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in c.items()}


def dense_float64(c: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every (token, slot) through its expert's full weights, gathered: no sorting, no grouping."""
    x, ids = c["hidden"].double(), c["topk_ids"]
    w13, w2 = c["w13"].double()[ids], c["w2"].double()[ids]  # [T, k, 2I, H], [T, k, H, I]
    inter = w2.shape[-1]
    gate_up = torch.einsum("tkoh,th->tko", w13, x)
    act = F.silu(gate_up[..., :inter]) * gate_up[..., inter:]
    down = torch.einsum("tkhi,tki->tkh", w2, act)
    return (down * c["topk_weights"].double()[..., None]).sum(1)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize(
    "shape", [(1, 8, 2, 32, 16), (13, 6, 3, 40, 24), (20, 8, 2, 32, 16, True), (0, 4, 2, 8, 4)]
)
def test_reference_is_the_dense_computation(shape: tuple) -> None:
    c = case(*shape[:5], skew=len(shape) > 5)
    got = ops.fused_experts(**c)
    assert got.shape == c["hidden"].shape and got.dtype == torch.float32
    torch.testing.assert_close(got, experts_reference(**c), rtol=0, atol=0)
    if got.numel():
        assert relative_error(got, dense_float64(c)) < 1e-6


@pytest.mark.parametrize("renormalize", [False, True])
def test_routing_is_hfs(renormalize: bool) -> None:
    """select_experts against the routers of transformers' Qwen3-MoE (norm_topk_prob either
    way) and Mixtral (always renormalized)."""
    from transformers import MixtralConfig, Qwen3MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    torch.manual_seed(0)
    h = torch.randn(37, 16)
    qwen = Qwen3MoeTopKRouter(
        Qwen3MoeConfig(
            hidden_size=16, num_experts=10, num_experts_per_tok=3, norm_topk_prob=renormalize
        )
    )
    routers = [(qwen, renormalize)]
    if renormalize:
        mixtral = MixtralTopKRouter(
            MixtralConfig(hidden_size=16, num_local_experts=10, num_experts_per_tok=3)
        )
        routers.append((mixtral, True))
    for router, renorm in routers:
        torch.nn.init.normal_(router.weight)
        with torch.no_grad():
            _, hf_weights, hf_ids = router(h)
            weights, ids = select_experts(F.linear(h, router.weight), 3, renorm)
        assert torch.equal(ids, hf_ids)
        torch.testing.assert_close(weights, hf_weights.float(), rtol=0, atol=0)


def test_fake_shapes() -> None:
    with FakeTensorMode():
        bf16 = torch.bfloat16
        hidden, w13, w2 = (
            torch.empty(5, 16, dtype=bf16),
            torch.empty(4, 16, 16, dtype=bf16),
            torch.empty(4, 16, 8, dtype=bf16),
        )
        ids = torch.empty(5, 2, dtype=torch.int64)
        out = ops.fused_experts(hidden, w13, w2, torch.empty(5, 2), ids)
        assert out.shape == (5, 16) and out.dtype == bf16


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("hidden", torch.zeros(5, 16, 1), "hidden must be"),
        ("w13", torch.zeros(4, 15, 16), "w13 must be"),
        ("w2", torch.zeros(4, 16, 7), r"w2 must be \(4, 16, 8\)"),
        ("topk_ids", torch.zeros(4, 2, dtype=torch.int64), "topk_ids must be"),
        ("topk_weights", torch.zeros(5, 3), "differ in shape"),
        ("w2", torch.zeros(4, 16, 8, dtype=torch.float64), "differ in dtype"),
    ],
)
def test_bad_shapes_are_refused(key: str, value: torch.Tensor, message: str) -> None:
    c = case(5, 4, 2, 16, 8)
    c[key] = value
    with pytest.raises(ValueError, match=message):
        ops.fused_experts(**c)


@pytest.mark.parametrize(
    ("tokens", "experts", "top_k", "block_m", "skew"),
    [(1, 8, 2, 16, False), (20, 8, 2, 16, True), (70, 4, 1, 64, False), (3, 128, 8, 16, False)],
)
def test_sort_by_expert_blocks(tokens: int, experts: int, top_k: int, block_m: int, skew: bool):
    """Every (token, slot) row once, each block's rows all of the block's expert, padding only
    with the sentinel, and blocks past the last expert's marked with `experts`."""
    pytest.importorskip("triton")
    from compiled_llm.kernels.triton_moe import sort_by_expert

    ids = case(tokens, experts, top_k, 8, 4, skew=skew)["topk_ids"]
    blocks = sort_by_expert(ids, experts, block_m)
    flat = ids.reshape(-1)
    rows = blocks.sorted_ids.view(-1, block_m).long()
    assert rows.shape[0] == blocks.block_expert.numel()
    real = rows[rows < flat.numel()]
    assert sorted(real.tolist()) == list(range(flat.numel()))
    for block, expert in zip(rows, blocks.block_expert.tolist(), strict=True):
        mine = block[block < flat.numel()]
        if expert == experts:
            assert mine.numel() == 0
        else:
            assert mine.numel() > 0 and bool((flat[mine] == expert).all())
    used = int((blocks.block_expert < experts).sum())
    assert used == sum(-(-int(n) // block_m) for n in torch.bincount(flat, minlength=experts))


# --- Triton under the interpreter ------------------------------------------------------------
INTERPRETER_CASES = {
    # name: (tokens, experts, top_k, hidden, inter, skew); sizes below and off the tiles
    "decode": (1, 8, 2, 32, 16, False),
    "odd_sizes": (5, 8, 2, 48, 40, False),
    "skewed_16_row_blocks": (20, 8, 2, 32, 16, True),
    "64_row_blocks": (70, 4, 1, 32, 24, False),
    "many_experts": (3, 32, 4, 16, 16, False),
    "empty": (0, 4, 2, 16, 8, False),
}


def interpreter_errors() -> None:
    """Run under TRITON_INTERPRET=1: print each case's relative error against the float32
    reference on the same (rounded) inputs, and for float16 the torch float16 reference's."""
    from compiled_llm.kernels.triton_moe import fused_experts

    errors = {}
    for name, (*shape, skew) in INTERPRETER_CASES.items():
        for dtype in (torch.float32, torch.float16):
            c = case(*shape, dtype=dtype, skew=skew)
            if name == "odd_sizes":  # hidden a strided view, as a column slice of a wider tensor
                wide = torch.cat([c["hidden"], c["hidden"]], dim=1)
                c["hidden"] = wide[:, : c["hidden"].shape[1]]
            got = fused_experts(**c)
            assert got.shape == c["hidden"].shape and got.dtype == dtype
            truth = experts_reference(**upcast(c, torch.float32))
            key = f"{name}/{str(dtype).removeprefix('torch.')}"
            errors[key] = relative_error(got, truth) if got.numel() else 0.0
            if dtype == torch.float16 and got.numel():
                errors[f"{key}/torch"] = relative_error(experts_reference(**c), truth)
    print(json.dumps(errors))


@pytest.fixture(scope="module")
def interpreted() -> dict[str, float]:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = "from tests.kernels.test_moe import interpreter_errors; interpreter_errors()"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(INTERPRETER_CASES))
def test_triton_interpreted_matches_reference(interpreted: dict[str, float], name: str) -> None:
    # float32: equal up to summation order. float16: as close to the truth as torch's own
    # float16 computation (same roundings between the GEMMs, one more of the weighted slots).
    assert interpreted[f"{name}/float32"] <= 1e-6
    if name != "empty":
        fp16, torch_fp16 = interpreted[f"{name}/float16"], interpreted[f"{name}/float16/torch"]
        assert fp16 <= 1.5 * torch_fp16 + 1e-4, (fp16, torch_fp16)


# --- CUDA ------------------------------------------------------------------------------------
GPU_SHAPES = {
    # (experts, top_k, hidden, moe intermediate): the real models' expert layers
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "mixtral-8x7b": (8, 2, 4096, 14336),
}
GPU_TOKENS = {"qwen3-30b-a3b": (1, 4, 64, 300, 4096), "mixtral-8x7b": (1, 33, 512)}


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("shape", "tokens"), [(s, t) for s, ts in GPU_TOKENS.items() for t in ts] + [("skewed", 256)]
)
def test_cuda_bf16_matches_reference(shape: str, tokens: int) -> None:
    """bfloat16 at the real expert shapes (decode to prefill sizes; `skewed`: Qwen3-30B-A3B's
    shape with every token's first choice one expert). Tolerance: relative (Frobenius) error
    against the float32 reference on the same bfloat16 inputs at most 1e-2, and at most twice
    torch's own bfloat16 computation's plus 1e-3."""
    experts, top_k, hidden, inter = GPU_SHAPES["qwen3-30b-a3b" if shape == "skewed" else shape]
    c = case(tokens, experts, top_k, hidden, inter, torch.bfloat16, "cuda", skew=shape == "skewed")
    got = ops.fused_experts(**c)
    truth = experts_reference(**upcast(c, torch.float32))
    err, torch_err = relative_error(got, truth), relative_error(experts_reference(**c), truth)
    assert err <= 1e-2 and err <= 2 * torch_err + 1e-3, (err, torch_err)


@pytest.mark.gpu
def test_cuda_float32_matches_reference() -> None:
    """float32 GEMMs in full precision (no TF32)."""
    c = case(37, 16, 4, 256, 96, torch.float32, "cuda")
    assert relative_error(ops.fused_experts(**c), experts_reference(**c)) <= 1e-5


@pytest.mark.gpu
def test_cuda_graph_replay_follows_new_routing() -> None:
    """The op captured in a CUDA graph (as in the engine's piecewise graphs) and replayed after
    the routing changed in place gives the eager result of the new routing: no host sync, no
    shape read from the data."""
    experts, top_k, hidden, inter = GPU_SHAPES["qwen3-30b-a3b"]
    first = case(8, experts, top_k, hidden, inter, torch.bfloat16, "cuda", seed=1)
    second = case(8, experts, top_k, hidden, inter, torch.bfloat16, "cuda", seed=2, skew=True)
    static = {k: v.clone() for k, v in first.items()}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.fused_experts(**static)  # compile the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.fused_experts(**static)
    for inputs in (second, first):
        for k, v in inputs.items():
            static[k].copy_(v)
        graph.replay()
        torch.testing.assert_close(out, ops.fused_experts(**inputs), rtol=0, atol=0)
