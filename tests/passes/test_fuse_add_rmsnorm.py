"""fuse_add_rmsnorm: residual add + RMSNorm (and a lone RMSNorm) become one op each, in float32
and bf16, whether the add is written out or Inductor has folded it into an addmm (CPU)."""

from __future__ import annotations

import pytest
import torch

from compiled_llm.layers.norm import rms_norm
from tests.passes.harness import compile_with_passes, dynamic

FUSED = "compiled_llm.fused_add_rms_norm.default"
LONE = "compiled_llm.rms_norm.default"


def two_norms(x: torch.Tensor, branch: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor):
    """A layer's shape: a lone norm of the input, then residual add + norm."""
    a = rms_norm(x, w1, 1e-5)
    h = x + branch * a  # the residual add (not after a GEMM: stays an add)
    return rms_norm(h, w2, 1e-5), h


def after_gemm(x: torch.Tensor, residual: torch.Tensor, lin: torch.Tensor, w: torch.Tensor):
    h = residual + x @ lin  # Inductor makes this addmm(residual, x, lin) on CPU
    return rms_norm(h, w, 1e-6), h


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_and_lone_norm(dtype: torch.dtype) -> None:
    x, branch = torch.randn(7, 64, dtype=dtype), torch.randn(7, 64, dtype=dtype)
    w1, w2 = torch.randn(64, dtype=dtype), torch.randn(64, dtype=dtype)
    c = compile_with_passes(two_norms, ["fuse_add_rmsnorm"], dtype)
    with torch.no_grad():
        out = c.fn(*dynamic(x, branch), w1, w2)
        expected = two_norms(x, branch, w1, w2)
    assert c.before["aten.rsqrt.default"] == 2 and c.before[FUSED] == 0
    assert c.after[FUSED] == 1 and c.after[LONE] == 1
    assert c.after["aten.rsqrt.default"] == 0 and c.after["aten.mean.dim"] == 0
    assert c.matches("fuse_add_rmsnorm") == 2
    for got, want in zip(out, expected):  # the CPU op is the model's own code: exact
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_folded_into_addmm(dtype: torch.dtype) -> None:
    x, residual = torch.randn(5, 32, dtype=dtype), torch.randn(5, 32, dtype=dtype)
    lin, w = torch.randn(32, 32, dtype=dtype), torch.randn(32, dtype=dtype)
    c = compile_with_passes(after_gemm, ["fuse_add_rmsnorm"], dtype)
    with torch.no_grad():
        out = c.fn(*dynamic(x, residual), lin, w)
        expected = after_gemm(x, residual, lin, w)
    assert c.before["aten.addmm.default"] == 1 and c.before["aten.rsqrt.default"] == 1
    assert c.after["aten.addmm.default"] == 0 and c.after["aten.mm.default"] == 1
    assert c.after[FUSED] == 1 and c.after["aten.rsqrt.default"] == 0
    tol = {"rtol": 1.6e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {}
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want, **tol)
    with torch.no_grad():  # a single token: the graph is valid for any num_tokens
        torch.testing.assert_close(c.fn(x[:1], residual[:1], lin, w)[0], expected[0][:1], **tol)
