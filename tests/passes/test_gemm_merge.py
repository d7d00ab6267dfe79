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


# --- FP8 linears (quantization/fp8.py) ------------------------------------------------------------
FP8_MM = "compiled_llm.fp8_scaled_mm.default"


def fp8_block(bias: bool, block_size: tuple[int, int] | None) -> Block:
    """`Block` with every linear quantized to FP8 (per channel, or per block)."""
    from compiled_llm.quantization.fp8 import Fp8Linear

    torch.manual_seed(0)
    block = Block(bias)
    for name, module in list(block.named_children()):
        setattr(block, name, Fp8Linear.from_linear(module, block_size))
    return block.eval()


@pytest.mark.parametrize(
    "bias, block_size", [(False, None), (True, None), (False, (16, 16))], ids=str
)
def test_merges_fp8_projections(bias: bool, block_size: tuple[int, int] | None) -> None:
    """q/k/v and gate/up FP8 GEMMs become one each: weights and scales merged, one activation
    quantization per group, and the same outputs as the separate GEMMs."""
    block = fp8_block(bias, block_size)
    reference = copy.deepcopy(block)
    quant = (
        "compiled_llm.quant_fp8_per_group.default"
        if block_size
        else ("compiled_llm.quant_fp8_per_token.default")
    )
    c = compile_with_passes(block, ["gemm_merge"], stage="graph", inductor=False)
    x = torch.randn(9, 32)
    with torch.no_grad():
        got = c.fn(*dynamic(x.clone()))
        expected = reference(x)
    assert c.before[FP8_MM] == 7 and c.after[FP8_MM] == 4
    assert c.before[quant] == 7 and c.after[quant] == 4  # one per merged group
    assert c.matches("gemm_merge") == 2
    for g, w in zip(got, expected):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    for names in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
        layers = [getattr(block, n) for n in names]
        assert_merged([m.weight for m in layers])
        assert_merged([m.weight_scale for m in layers])


def test_fp8_static_scales_merge_only_when_equal() -> None:
    """Static activation scales: one quantization serves a group only if its scales are equal."""
    from compiled_llm.quantization.fp8 import Fp8Linear

    def static(block: Block, scales: dict[str, float]) -> Block:
        for name, value in scales.items():
            old = getattr(block, name)
            layer = Fp8Linear(32, old.out_features, old.bias is not None, None, True)
            layer.weight.data, layer.weight_scale.data = old.weight.data, old.weight_scale.data
            layer.input_scale.data = torch.tensor([value])  # type: ignore[union-attr]
            setattr(block, name, layer)
        return block

    equal = static(fp8_block(False, None), dict(q_proj=0.01, k_proj=0.01, v_proj=0.01))
    unequal = static(fp8_block(False, None), dict(q_proj=0.01, k_proj=0.02, v_proj=0.03))
    x = torch.randn(6, 32)
    for block, matches in ((equal, 2), (unequal, 1)):  # gate/up (dynamic) merge either way
        reference = copy.deepcopy(block)
        c = compile_with_passes(block, ["gemm_merge"], stage="graph", inductor=False)
        with torch.no_grad():
            for g, w in zip(c.fn(*dynamic(x.clone())), reference(x)):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        assert c.matches("gemm_merge") == matches
