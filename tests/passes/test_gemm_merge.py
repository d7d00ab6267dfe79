"""gemm_merge: linears sharing an input become one GEMM on a merged weight that the original
parameters now view (no copy per step, no memory duplicated); idempotent across compiles."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from tests.passes.harness import compile_with_passes, dynamic

LINEAR = "torch._C._nn.linear"


class Block(nn.Module):
    """Attention projections and a SwiGLU MLP, as the models write them."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.q_proj = nn.Linear(32, 64, bias=bias)
        self.k_proj = nn.Linear(32, 16, bias=bias)
        self.v_proj = nn.Linear(32, 16, bias=bias)
        self.gate_proj = nn.Linear(32, 48, bias=False)
        self.up_proj = nn.Linear(32, 48, bias=False)
        self.down_proj = nn.Linear(48, 32, bias=False)
        self.other = nn.Linear(32, 8)  # reads a different input: left alone

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q = self.q_proj(x).view(-1, 4, 16)
        k, v = self.k_proj(x), self.v_proj(x)
        m = x * 2  # the MLP reads another tensor than the projections (as after a norm)
        h = x + self.down_proj(F.silu(self.gate_proj(m)) * self.up_proj(m))
        return q, k, v, h, self.other(h)


def groups(block: Block) -> list[list[torch.Tensor]]:
    g = [[block.q_proj.weight, block.k_proj.weight, block.v_proj.weight]]
    if block.q_proj.bias is not None:
        g.append([block.q_proj.bias, block.k_proj.bias, block.v_proj.bias])
    g.append([block.gate_proj.weight, block.up_proj.weight])
    return g


def assert_merged(tensors: list[torch.Tensor]) -> None:
    """Views of one storage, back to back, which holds nothing else (nothing duplicated)."""
    storage = tensors[0].untyped_storage()
    offset = 0
    for t in tensors:
        assert t.is_contiguous() and t.untyped_storage().data_ptr() == storage.data_ptr()
        assert t.storage_offset() == offset
        offset += t.numel()
    assert storage.nbytes() == offset * tensors[0].element_size()


@pytest.mark.parametrize("bias", [False, True])
def test_merges_projections(bias: bool) -> None:
    torch.manual_seed(0)
    block = Block(bias).eval()
    reference = copy.deepcopy(block)
    c = compile_with_passes(block, ["gemm_merge"], stage="graph")
    x = torch.randn(20, 32)
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        got = c.fn(*dynamic(x.clone()))
        for n in (2, 3, 17):  # other sizes reuse the graph: the merge broke no guard
            for g, w in zip(c.fn(x[:n].clone()), reference(x[:n])):
                torch.testing.assert_close(g, w)
    assert counters["stats"]["unique_graphs"] == graphs + 1
    assert c.before[LINEAR] == 7 and c.after[LINEAR] == 4
    assert c.after["torch.as_strided"] == (3 if bias else 2)  # + the q/k/v bias
    assert c.matches("gemm_merge") == 2
    for g, w in zip(got, reference(x)):
        torch.testing.assert_close(g, w)
    for tensors in groups(block):
        assert_merged(tensors)
    for g, w in zip(block(x), reference(x)):  # eager use of the module is unchanged
        torch.testing.assert_close(g, w)


def test_second_compile_reuses_the_merge() -> None:
    """Graph passes run on every start: the second run finds the parameters merged."""
    block = Block(bias=True).eval()
    reference = copy.deepcopy(block)
    x = torch.randn(5, 32)
    with torch.no_grad():
        compile_with_passes(block, ["gemm_merge"], stage="graph").fn(*dynamic(x.clone()))
        pointers = [t.data_ptr() for g in groups(block) for t in g]
        again = compile_with_passes(block, ["gemm_merge"], stage="graph")
        got = again.fn(*dynamic(x.clone()))
    assert again.matches("gemm_merge") == 2
    assert [t.data_ptr() for g in groups(block) for t in g] == pointers
    for g, w in zip(got, reference(x)):
        torch.testing.assert_close(g, w)


def test_skips_what_it_cannot_merge() -> None:
    """A weight shared by two sites, and weights that are not parameters, stay separate."""

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(16, 16, bias=False)
            self.b = nn.Linear(16, 16, bias=False)

        def forward(self, x: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
            tied = self.a(x) + F.linear(x, self.a.weight) + self.b(x)
            return tied + F.linear(x, w) + F.linear(x, u)  # plain tensors, not parameters

    m = Shared()
    x, w, u = torch.randn(4, 16), torch.randn(16, 16), torch.randn(16, 16)
    expected = m(x, w, u)
    c = compile_with_passes(m, ["gemm_merge"], stage="graph", inductor=False)
    with torch.no_grad():
        torch.testing.assert_close(c.fn(*dynamic(x), w, u), expected)
    assert c.matches("gemm_merge") == 0 and c.after[LINEAR] == c.before[LINEAR] == 5
    assert m.a.weight.untyped_storage().data_ptr() != m.b.weight.untyped_storage().data_ptr()
