"""The FP8 quantization passes: RMSNorm (+ residual add) + quantization and SiLU-and-mul +
quantization become one op each, repeated quantizations of one tensor become one; op counts
before and after, and outputs equal to eager (the CPU fused ops are the unfused ops' code)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compiled_llm.kernels.fp8 import fp8_linear, quantize_weight
from compiled_llm.layers.norm import rms_norm
from tests.passes.harness import compile_with_passes, dynamic

PER_TOKEN = "compiled_llm.quant_fp8_per_token.default"
PER_GROUP = "compiled_llm.quant_fp8_per_group.default"
NORM_Q = "compiled_llm.rms_norm_quant_fp8.default"
ADD_NORM_Q = "compiled_llm.fused_add_rms_norm_quant_fp8.default"
ACT_Q = "compiled_llm.silu_and_mul_quant_fp8.default"


def weight(n: int, k: int, block: list[int], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    w, s = quantize_weight(torch.randn(n, k) * 0.05, tuple(block) if block else None)  # type: ignore[arg-type]
    return w, s


def layer(x, branch, w1, w2, lin1, s1, lin2, s2, block):  # noqa: ANN001
    """A decoder layer's shape: input norm -> FP8 linear; residual add -> norm -> FP8 linear."""
    a = fp8_linear(rms_norm(x, w1, 1e-5), lin1, s1, None, block)
    h = x + branch * a[:, : x.shape[1]]
    return fp8_linear(rms_norm(h, w2, 1e-5), lin2, s2, None, block), h


@pytest.mark.parametrize("block", [[], [128, 128]], ids=["per-token", "per-group"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fuse_norm_quant(block: list[int], dtype: torch.dtype) -> None:
    k = 256
    x, branch = torch.randn(7, k, dtype=dtype), torch.randn(7, k, dtype=dtype)
    w1, w2 = (1 + 0.1 * torch.randn(k)).to(dtype), (1 + 0.1 * torch.randn(k)).to(dtype)
    lin1, s1 = weight(k, k, block, dtype)
    lin2, s2 = weight(384, k, block, dtype)
    args = (w1, w2, lin1, s1, lin2, s2, block)
    c = compile_with_passes(layer, ["fuse_norm_quant"], dtype)
    with torch.no_grad():
        out = c.fn(*dynamic(x, branch), *args)
        expected = layer(x, branch, *args)
    quant = PER_GROUP if block else PER_TOKEN
    assert c.before[quant] == 2 and c.before["aten.rsqrt.default"] == 2
    assert c.after[quant] == 0 and c.after["aten.rsqrt.default"] == 0
    assert c.after[NORM_Q] == 1 and c.after[ADD_NORM_Q] == 1
    assert c.matches("fuse_norm_quant") == 2
    for got, want in zip(out, expected):  # the CPU ops are the unfused ops' code
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_other_group_widths_are_left_alone() -> None:
    """Only the matched granularities are rewritten: a 64-column grouping stays unfused."""
    k = 256
    x, branch, w = torch.randn(5, k), torch.randn(5, k), torch.ones(k)
    lin, s = weight(k, k, [64, 64], torch.float32)
    c = compile_with_passes(layer, ["fuse_norm_quant"])
    with torch.no_grad():
        c.fn(*dynamic(x, branch), w, w, lin, s, lin, s, [64, 64])
    assert c.after[PER_GROUP] == 2 and c.matches("fuse_norm_quant") == 0


def mlp(x, gate_up, s_gu, down, s_d, block):  # noqa: ANN001
    """The merged MLP gemm_merge leaves: one FP8 GEMM, split, SiLU-and-mul, FP8 down_proj."""
    gate, up = fp8_linear(x, gate_up, s_gu, None, block).split(down.shape[1], dim=-1)
    return fp8_linear(F.silu(gate) * up, down, s_d, None, block)


@pytest.mark.parametrize("block", [[], [128, 128]], ids=["per-token", "per-group"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fuse_act_quant(block: list[int], dtype: torch.dtype) -> None:
    x = torch.randn(6, 128, dtype=dtype)
    gate_up, s_gu = weight(512, 128, block, dtype)
    down, s_d = weight(128, 256, block, dtype)
    c = compile_with_passes(mlp, ["fuse_act_quant"], dtype)
    with torch.no_grad():
        got = c.fn(*dynamic(x.clone()), gate_up, s_gu, down, s_d, block)
        want = mlp(x, gate_up, s_gu, down, s_d, block)
    quant = PER_GROUP if block else PER_TOKEN
    assert c.before[quant] == 2 and c.before["aten.exp.default"] == 1  # silu, decomposed
    assert c.after[quant] == 1 and c.after[ACT_Q] == 1  # x's own quantization stays
    assert c.after["aten.exp.default"] == 0
    assert c.matches("fuse_act_quant") == 1
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def projections(x, w, lq, sq, lk, sk, lv, sv):  # noqa: ANN001
    """q/k/v as separate FP8 linears on one normalized input (gemm_merge off)."""
    h = rms_norm(x, w, 1e-6)
    return tuple(fp8_linear(h, lin, s, None, []) for lin, s in ((lq, sq), (lk, sk), (lv, sv)))


def test_dedup_quant_then_norm_fusion() -> None:
    x, w = torch.randn(5, 64), torch.ones(64)
    weights = [t for n in (64, 32, 32) for t in weight(n, 64, [], torch.float32)]
    expected = projections(x, w, *weights)
    alone = compile_with_passes(projections, ["dedup_quant"])
    both = compile_with_passes(projections, ["dedup_quant", "fuse_norm_quant"])
    norm_only = compile_with_passes(projections, ["fuse_norm_quant"])
    with torch.no_grad():
        for c in (alone, both, norm_only):
            # Where Inductor computes the norm its float32 roundings differ from eager's, and
            # one may tip an E4M3 rounding: allow that; the fused op is eager's code.
            tol = {"rtol": 0, "atol": 0} if c is both else {"rtol": 0.02, "atol": 0.02}
            for got, want in zip(c.fn(*dynamic(x.clone()), w, *weights), expected):
                torch.testing.assert_close(got, want, **tol)
    assert alone.before[PER_TOKEN] == 3 and alone.after[PER_TOKEN] == 1
    assert alone.matches("dedup_quant") == 2
    assert both.after[PER_TOKEN] == 0 and both.after[NORM_Q] == 1
    # Without it the norm's output feeds three quantizations and is not fused.
    assert norm_only.after[PER_TOKEN] == 3 and norm_only.matches("fuse_norm_quant") == 0
