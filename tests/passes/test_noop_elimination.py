"""noop_elimination: ops that return their input (same-shape reshape, full slice, identity
permute/expand, clone of a contiguous tensor) are dropped and view chains collapse."""

from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from compiled_llm.passes.base import PassContext
from compiled_llm.passes.noop_elimination import NoopEliminationPass
from tests.passes.harness import compile_with_passes, dynamic, op_counts

aten = torch.ops.aten


def leftovers(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What survives Dynamo and Inductor's own no-op removal: a view chain, an identity
    permute, an expand to the same shape."""
    b = (x * 2).view(-1, 2, 16).view(-1, 8, 4)
    d = (x + 1).permute(0, 1)
    e = (x * 3).expand(x.shape[0], 32)
    return b * 2, d * 4, e * 5


def test_post_grad_leftovers() -> None:
    x = torch.randn(5, 32)
    c = compile_with_passes(leftovers, ["noop_elimination"])
    with torch.no_grad():
        got = c.fn(*dynamic(x.clone()))
    assert c.before["aten.permute.default"] == 1 and c.before["aten.expand.default"] == 1
    assert c.after["aten.permute.default"] == 0 and c.after["aten.expand.default"] == 0
    assert c.after["aten.reshape.default"] < c.before["aten.reshape.default"]
    assert c.matches("noop_elimination") >= 3
    for g, w in zip(got, leftovers(x)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def every_rule(x: torch.Tensor) -> torch.Tensor:
    a = aten.add.Tensor(x, 1)
    a = aten.reshape.default(a, [x.shape[0], 32])  # same shape
    a = aten.slice.Tensor(a, 1, 0, 9223372036854775807)  # full slice
    a = aten.slice.Tensor(a, 0, 0, a.shape[0])  # full slice, symbolic end
    a = aten.clone.default(a, memory_format=torch.contiguous_format)  # already contiguous
    a = aten.permute.default(a, [0, 1])
    a = aten.view.default(aten.view.default(a, [-1, 4, 8]), [-1, 2, 16])  # chain
    return aten.mul.Tensor(a, 2)


def test_every_rule_on_an_aten_graph() -> None:
    """Rules Inductor's own removal usually gets to first, on a symbolic aten graph."""
    gm = make_fx(every_rule, tracing_mode="symbolic")(torch.randn(5, 32))
    before = op_counts(gm.graph)
    matches = NoopEliminationPass(PassContext("cpu", torch.float32, "torch")).apply(gm.graph)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    after = op_counts(gm.graph)
    assert before["aten.slice.Tensor"] == 2 and before["aten.clone.default"] == 1
    assert after["aten.slice.Tensor"] == after["aten.clone.default"] == 0
    assert after["aten.reshape.default"] == after["aten.permute.default"] == 0
    assert after["aten.view.default"] == 1
    assert matches == 6
    x = torch.randn(3, 32)
    torch.testing.assert_close(gm(x), every_rule(x), rtol=0, atol=0)


def test_keeps_real_work() -> None:
    """A partial slice, a real reshape, and a clone of a non-contiguous tensor all stay."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        a = aten.slice.Tensor(x, 1, 0, 16)
        b = aten.clone.default(aten.permute.default(x, [1, 0]))
        return aten.add.Tensor(aten.reshape.default(a, [-1]), aten.reshape.default(b, [-1])[:1])

    gm = make_fx(fn, tracing_mode="symbolic")(torch.randn(5, 32))
    before = op_counts(gm.graph)
    assert NoopEliminationPass(PassContext("cpu", torch.float32, "torch")).apply(gm.graph) == 0
    assert op_counts(gm.graph) == before
