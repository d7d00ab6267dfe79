"""onednn_linear: float32 mm/addmm of a transposed [out, in] matrix become
compiled_llm::onednn_linear on CPU (a 1-D addend as its bias, a 2-D one added after it), with
eager's numbers; other dtypes and other GEMMs are left alone; on by default only for float32 on
CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from compiled_llm.kernels import cpu_linear
from compiled_llm.passes.base import PassContext
from compiled_llm.passes.registry import resolve_pipeline
from tests.passes.harness import compile_with_passes, dynamic

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="torch without oneDNN")
OP = "compiled_llm.onednn_linear.default"


def block(x, w_in, b_in, w_out, residual):  # noqa: ANN001, ANN201
    """A linear with a bias, one without whose output feeds a residual add, and a GEMM whose
    second operand is not a transposed [out, in] matrix (left alone)."""
    h = F.silu(F.linear(x, w_in, b_in))
    y = F.linear(h, w_out) + residual
    return y, y @ w_out


def inputs(rows: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 64, generator=gen)
    w_in, b_in = torch.randn(96, 64, generator=gen), torch.randn(96, generator=gen)
    w_out, residual = torch.randn(64, 96, generator=gen) / 10, torch.randn(rows, 64, generator=gen)
    return tuple(t.to(dtype) for t in (x, w_in, b_in, w_out, residual))


def test_rewrites_weight_gemms_with_eager_numbers() -> None:
    c = compile_with_passes(block, ["onednn_linear"])
    with torch.no_grad():
        for rows in (7, 33):  # dim 0 dynamic: one graph serves both
            x, w_in, b_in, w_out, residual = inputs(rows, torch.float32)
            got = c.fn(*dynamic(x.clone()), w_in, b_in, w_out, *dynamic(residual.clone()))
            want = block(x, w_in, b_in, w_out, residual)
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-3)
    gemms = c.before["aten.mm.default"] + c.before["aten.addmm.default"]
    assert gemms == 3
    assert c.after[OP] == 2 and c.after["aten.mm.default"] + c.after["aten.addmm.default"] == 1
    assert c.matches("onednn_linear") == 2


def test_other_dtypes_left_alone() -> None:
    c = compile_with_passes(block, ["onednn_linear"], torch.bfloat16)
    with torch.no_grad():
        c.fn(*inputs(5, torch.bfloat16))
    assert c.after[OP] == 0 and c.matches("onednn_linear") == 0


@pytest.mark.parametrize(
    ("device", "dtype", "on"),
    [("cpu", torch.float32, True), ("cpu", torch.bfloat16, False), ("cuda", torch.float32, False)],
)
def test_default_only_for_cpu_float32(device: str, dtype: torch.dtype, on: bool) -> None:
    names = [c.name for c in resolve_pipeline([], PassContext(device, dtype, "torch"))]
    assert ("onednn_linear" in names) == on


class _Ops(TorchDispatchMode):
    """Records the ops that reach the dispatcher."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_eager_mode_runs_the_output_head_on_onednn() -> None:
    """The pass's eager counterpart, as the model runner enters it around `compute_logits`:
    F.linear of a float32 CPU input (2-D or 3-D, with a bias or not) runs the op, with float32's
    numbers against a float64 reference; other inputs keep F.linear. Outside CPU float32 the
    pass has no eager mode."""
    from compiled_llm.passes.onednn_linear import OneDNNLinearPass

    mode = OneDNNLinearPass(PassContext("cpu", torch.float32, "torch")).eager_mode()
    assert mode is not None
    assert OneDNNLinearPass(PassContext("cuda", torch.float32, "torch")).eager_mode() is None
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(300, 64, generator=gen), torch.randn(300, generator=gen)
    for x, bias in ((torch.randn(5, 64, generator=gen), None), (torch.randn(2, 3, 64), b)):
        want = F.linear(x.double(), w.double(), None if bias is None else bias.double())
        with mode, _Ops() as ops:
            got = F.linear(x, w, bias)
        assert OP in ops.seen and "aten.mm.default" not in ops.seen, ops.seen
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    for x, weight in ((torch.randn(4, 64).double(), w.double()), (torch.randn(4, 300), w.t())):
        with mode, _Ops() as ops:
            got = F.linear(x, weight)
        assert OP not in ops.seen
        torch.testing.assert_close(got, x @ weight.t())
