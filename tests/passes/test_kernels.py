"""The fused ops: CPU implementations equal the model's layer code, fake implementations give the
right shapes, and the Triton kernels match the reference — on CPU under TRITON_INTERPRET=1 (in a
subprocess: the variable must be set before triton is imported), on CUDA in the `gpu` tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import compiled_llm.kernels  # noqa: F401
from compiled_llm.layers.norm import rms_norm
from compiled_llm.layers.rotary import apply_rotary

ops = torch.ops.compiled_llm
ROOT = Path(__file__).resolve().parents[2]


def inputs(
    dtype: torch.dtype, device: str = "cpu", hidden: int = 48, heads: int = 3, d: int = 24
) -> dict[str, torch.Tensor]:
    """Sizes that are not powers of two; gate/up are strided halves of one merged tensor and q a
    strided view, as after gemm_merge's split."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dt)

    merged = rand(5, 2 * hidden)
    return {
        "x": rand(5, hidden),
        "r": rand(5, hidden),
        "w": rand(hidden),
        "gate": merged[:, :hidden],
        "up": merged[:, hidden:],
        "q": rand(5, 3 * heads * d)[:, : heads * d].view(5, heads, d),
        "cos": rand(5, d // 2, dt=torch.float32),
        "sin": rand(5, d // 2, dt=torch.float32),
        "wq": rand(d),
    }


Fn = Callable[[dict[str, torch.Tensor]], torch.Tensor]
REFERENCE: dict[str, Fn] = {  # the model's own layer code
    "rms_norm": lambda t: rms_norm(t["x"], t["w"], 1e-6),
    "fused_add_rms_norm": lambda t: torch.cat(
        [rms_norm(t["x"] + t["r"], t["w"], 1e-6), t["x"] + t["r"]]
    ),
    "silu_and_mul": lambda t: F.silu(t["gate"]) * t["up"],
    "rotary_embedding": lambda t: apply_rotary(t["q"], t["cos"], t["sin"]),
    "rms_norm_rope": lambda t: apply_rotary(rms_norm(t["q"], t["wq"], 1e-6), t["cos"], t["sin"]),
}
OPS: dict[str, Fn] = {
    "rms_norm": lambda t: ops.rms_norm(t["x"], t["w"], 1e-6),
    "fused_add_rms_norm": lambda t: torch.cat(ops.fused_add_rms_norm(t["x"], t["r"], t["w"], 1e-6)),
    "silu_and_mul": lambda t: ops.silu_and_mul(t["gate"], t["up"]),
    "rotary_embedding": lambda t: ops.rotary_embedding(t["q"], t["cos"], t["sin"]),
    "rms_norm_rope": lambda t: ops.rms_norm_rope(t["q"], t["wq"], t["cos"], t["sin"], 1e-6),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_ops_are_the_layer_code(dtype: torch.dtype) -> None:
    t = inputs(dtype)
    for name, op in OPS.items():
        got, want = op(t), REFERENCE[name](t)
        assert got.is_contiguous(), name
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)


def test_fake_shapes() -> None:
    with FakeTensorMode():
        x, w = torch.empty(7, 32, dtype=torch.bfloat16), torch.empty(32, dtype=torch.bfloat16)
        out, h = ops.fused_add_rms_norm(x, x, w, 1e-6)
        assert out.shape == h.shape == x.shape and out.dtype == torch.bfloat16
        q, cos = torch.empty(7, 4, 16), torch.empty(7, 8)
        assert ops.rms_norm_rope(q, torch.empty(16), cos, cos, 1e-6).shape == q.shape
        assert ops.silu_and_mul(x, x).shape == x.shape


def test_ops_reject_bad_shapes() -> None:
    with pytest.raises(ValueError, match="head_dim/2"):
        ops.rotary_embedding(torch.randn(3, 2, 16), torch.randn(3, 16), torch.randn(3, 16))
    with pytest.raises(ValueError, match="differ in shape"):
        ops.silu_and_mul(torch.randn(3, 8), torch.randn(3, 4))


def interpreter_errors() -> None:
    """Run under TRITON_INTERPRET=1: print each Triton kernel's max error vs the reference."""
    from compiled_llm.kernels import triton_activation, triton_norm, triton_rotary

    kernels: dict[str, Fn] = {
        "rms_norm": lambda t: triton_norm.rms_norm(t["x"], t["w"], 1e-6)[0],
        "fused_add_rms_norm": lambda t: torch.cat(
            triton_norm.rms_norm(t["x"], t["w"], 1e-6, t["r"])  # type: ignore[arg-type]
        ),
        "silu_and_mul": lambda t: triton_activation.silu_and_mul(t["gate"], t["up"]),
        "rotary_embedding": lambda t: triton_rotary.rotary(t["q"], t["cos"], t["sin"]),
        "rms_norm_rope": lambda t: triton_rotary.rotary(t["q"], t["cos"], t["sin"], t["wq"], 1e-6),
    }
    errors = {}
    for dtype in (torch.float32, torch.bfloat16):
        t = inputs(dtype)
        for name, kernel in kernels.items():
            err = (kernel(t).float() - REFERENCE[name](t).float()).abs().max().item()
            errors[f"{name}/{dtype}"] = err
    empty = triton_norm.rms_norm(torch.empty(0, 8), torch.ones(8), 1e-6)[0]
    errors["empty"] = float(empty.numel())
    print(json.dumps(errors))


@pytest.mark.slow
def test_triton_kernels_interpreted() -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = "from tests.passes.test_kernels import interpreter_errors; interpreter_errors()"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert errors.pop("empty") == 0
    for key, err in errors.items():
        # float32: exact up to reassociation. bf16: the interpreter rounds to bf16 by
        # truncation (CUDA rounds to nearest), so allow a few units in the last place.
        assert err <= (1e-5 if "float32" in key else 0.25), (key, err)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_ops_match_reference(dtype: torch.dtype) -> None:
    for shape in ({}, {"hidden": 4096, "heads": 32, "d": 128}):
        t = inputs(dtype, "cuda", **shape)
        for name, op in OPS.items():
            got, want = op(t), REFERENCE[name](t)
            tol = (
                {"rtol": 2e-2, "atol": 2e-2}
                if dtype == torch.bfloat16
                else {"rtol": 1e-5, "atol": 1e-5}
            )
            torch.testing.assert_close(got, want, **tol, msg=f"{name} {shape}")
