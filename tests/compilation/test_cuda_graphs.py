"""The CUDA-graph wrapper: replays at captured addresses, copies activations in, dispatches by
(mode, size), and (in debug mode) refuses a replay whose other inputs moved."""

from __future__ import annotations

import pytest
import torch

from compiled_llm import envs
from compiled_llm.compilation.cuda_graphs import (
    CudaGraphWrapper,
    GraphMode,
    GraphPool,
    cuda_graph_mode,
)

pytestmark = pytest.mark.gpu


def affine(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return x @ w + b


@pytest.fixture
def pool() -> GraphPool:
    return GraphPool(torch.device("cuda"), max_tokens=16, static_ptrs=set())


def test_replay_copies_activations_and_keeps_static_inputs(pool: GraphPool) -> None:
    w = torch.randn(8, 8, device="cuda")
    b = torch.randn(8, device="cuda")
    pool.static_ptrs = {w.data_ptr()}
    g = CudaGraphWrapper(affine, pool, GraphMode.PIECEWISE)
    with cuda_graph_mode(GraphMode.PIECEWISE, 4, capturing=True):
        g(torch.randn(4, 8, device="cuda"), w, b)
    assert set(g.entries) == {4}
    for _ in range(3):  # new activations each step, copied into the captured buffer
        x = torch.randn(4, 8, device="cuda")
        with cuda_graph_mode(GraphMode.PIECEWISE, 4):
            out = g(x, w, b)
        torch.testing.assert_close(out, affine(x, w, b))
    assert pool.replays[GraphMode.PIECEWISE] == 3 and pool.replays[GraphMode.FULL] == 0


def test_other_mode_or_size_runs_eagerly(pool: GraphPool) -> None:
    w, b = torch.randn(8, 8, device="cuda"), torch.randn(8, device="cuda")
    inner = CudaGraphWrapper(affine, pool, GraphMode.PIECEWISE)
    outer = CudaGraphWrapper(lambda x: inner(x, w, b).relu(), pool, GraphMode.FULL)
    with cuda_graph_mode(GraphMode.FULL, 2, capturing=True):
        outer(torch.randn(2, 8, device="cuda"))
    assert set(outer.entries) == {2} and not inner.entries  # captured inside the full graph
    x = torch.randn(2, 8, device="cuda")
    with cuda_graph_mode(GraphMode.FULL, 2):
        torch.testing.assert_close(outer(x), affine(x, w, b).relu())
    with cuda_graph_mode(GraphMode.FULL, 3):  # no graph of this size: eager
        x3 = torch.randn(3, 8, device="cuda")
        torch.testing.assert_close(outer(x3), affine(x3, w, b).relu())
    assert pool.replays[GraphMode.FULL] == 1


def test_debug_mode_refuses_a_moved_input(pool: GraphPool) -> None:
    """A per-step tensor that is not an activation (here `b`, not `size` long) is replayed from
    its captured address: silently stale without the check, an error with it."""
    w = torch.randn(8, 8, device="cuda")
    pool.static_ptrs = {w.data_ptr()}
    with envs.override(debug_cuda_graphs=True):
        checked = CudaGraphWrapper(affine, pool, GraphMode.PIECEWISE)
    with envs.override(debug_cuda_graphs=False):
        unchecked = CudaGraphWrapper(affine, pool, GraphMode.PIECEWISE)
    x, b = torch.randn(4, 8, device="cuda"), torch.zeros(8, device="cuda")
    with cuda_graph_mode(GraphMode.PIECEWISE, 4, capturing=True):
        checked(x, w, b)
        unchecked(x, w, b)
    moved = torch.ones(8, device="cuda")
    with cuda_graph_mode(GraphMode.PIECEWISE, 4):
        torch.testing.assert_close(checked(x, w, b), affine(x, w, b))  # same addresses: fine
        stale = unchecked(x, w, moved)
        torch.testing.assert_close(stale, affine(x, w, b))  # read the captured `b`
        with pytest.raises(RuntimeError, match="argument 2"):
            checked(x, w, moved)
