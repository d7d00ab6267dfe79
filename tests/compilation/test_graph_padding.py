"""`CudaGraphRunner.padding`: which graph a step runs as, on CPU (no graph is captured)."""

from __future__ import annotations

from types import SimpleNamespace

from compiled_llm.engine.cuda_graph_runner import CudaGraphRunner


def padding(num_tokens: int, num_reqs: int, max_query_len: int, verify_len: int = 5):
    graphs = SimpleNamespace(
        decode_sizes=[1, 2, 4, 8, 16],
        verify_sizes=[1, 2, 4, 8] if verify_len > 1 else [],
        verify_len=verify_len,
        piecewise_sizes=[1, 2, 4, 8, 16, 32, 64, 128],
    )
    return CudaGraphRunner.padding(graphs, num_tokens, num_reqs, max_query_len)  # type: ignore[arg-type]


def test_decode_batches_pad_to_a_decode_graph() -> None:
    assert padding(3, 3, 1) == (4, 4)
    assert padding(16, 16, 1) == (16, 16)
    assert padding(17, 17, 1) == (32, None)  # above the largest decode graph: piecewise


def test_verification_batches_pad_requests_and_tokens() -> None:
    # 3 requests with 4 drafts each: 4 requests of 5 tokens
    assert padding(15, 3, 5) == (20, 4)
    # drafting and non-drafting requests mixed, fewer drafts than k: the same graph
    assert padding(1 + 3 + 5, 3, 5) == (20, 4)
    assert padding(7, 3, 3) == (20, 4)
    # a query longer than 1 + k (a prefill chunk) or more requests than the largest size
    assert padding(9, 3, 6) == (16, None)
    assert padding(45, 9, 5) == (64, None)


def test_no_verification_graphs_without_speculation() -> None:
    assert padding(7, 3, 3, verify_len=1) == (8, None)
    assert padding(300, 3, 100, verify_len=1) == (None, None)
