"""rope and qk_norm_rope: RoPE of q and k, and Qwen3's per-head q/k RMSNorm + RoPE, become one
op per tensor; qk_norm_rope runs first and takes the norm with it."""

from __future__ import annotations

import pytest
import torch

from compiled_llm.layers.norm import rms_norm
from compiled_llm.layers.rotary import apply_rotary
from tests.passes.harness import compile_with_passes, dynamic

ROPE = "compiled_llm.rotary_embedding.default"
NORM_ROPE = "compiled_llm.rms_norm_rope.default"


def attention_inputs(x, cache, positions, wq, wk, q_norm, k_norm, qk_norm: bool):
    cos, sin = cache.index_select(0, positions).chunk(2, dim=-1)  # as layers/rotary.py
    q = (x @ wq).view(-1, 4, 16)
    k = (x @ wk).view(-1, 2, 16)
    if qk_norm:
        q, k = rms_norm(q, q_norm, 1e-6), rms_norm(k, k_norm, 1e-6)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope(dtype: torch.dtype, qk_norm: bool) -> None:
    x, positions = torch.randn(7, 32, dtype=dtype), torch.randint(0, 64, (7,))
    cache = torch.randn(64, 16)  # float32, as the model's cos/sin table
    args = (torch.randn(32, 64, dtype=dtype), torch.randn(32, 32, dtype=dtype))
    norms = (torch.randn(16, dtype=dtype), torch.randn(16, dtype=dtype))

    def fn(x, cache, positions, wq, wk, q_norm, k_norm):
        return attention_inputs(x, cache, positions, wq, wk, q_norm, k_norm, qk_norm)

    c = compile_with_passes(fn, ["qk_norm_rope", "rope"], dtype)
    with torch.no_grad():
        got = c.fn(*dynamic(x), cache, *dynamic(positions), *args, *norms)
        want = fn(x, cache, positions, *args, *norms)
    assert c.before["aten.cat.default"] == 2 and c.before[ROPE] + c.before[NORM_ROPE] == 0
    assert c.after["aten.cat.default"] == 0
    if qk_norm:
        assert c.matches("qk_norm_rope") == 2 and c.matches("rope") == 0
        assert c.after[NORM_ROPE] == 2 and c.after["aten.rsqrt.default"] == 0
    else:
        assert c.matches("rope") == 2 and c.after[ROPE] == 2
    for g, w in zip(got, want):  # the CPU ops are the model's own code: exact
        torch.testing.assert_close(g, w, rtol=0, atol=0)
