"""silu_and_mul: silu(gate) * up becomes one op, for two GEMM outputs and for the two halves of
one merged GEMM output (what gemm_merge produces)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.passes.harness import compile_with_passes, dynamic

OP = "compiled_llm.silu_and_mul.default"


def mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor):
    return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down


def merged_mlp(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor):
    gate, up = (x @ w_gate_up).split(w_down.shape[0], dim=-1)
    return (F.silu(gate) * up) @ w_down


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul(dtype: torch.dtype) -> None:
    x = torch.randn(6, 32, dtype=dtype)
    wg, wu, wd = (torch.randn(32, 48, dtype=dtype) for _ in range(3))
    wd = wd.t().contiguous()
    merged = torch.cat([wg, wu], dim=1)
    for fn, args in ((mlp, (wg, wu, wd)), (merged_mlp, (merged, wd))):
        c = compile_with_passes(fn, ["silu_and_mul"], dtype)
        with torch.no_grad():
            got = c.fn(*dynamic(x.clone()), *args)
            want = fn(x, *args)
        assert c.before[OP] == 0 and c.before["aten.exp.default"] == 1  # silu, decomposed
        assert c.after[OP] == 1 and c.after["aten.exp.default"] == 0
        assert c.matches("silu_and_mul") == 1
        torch.testing.assert_close(
            got,
            want,
            rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
            atol=1e-2 if dtype == torch.bfloat16 else 1e-4,
        )
