"""CUDA graphs per padded batch size: piecewise graphs around eager attention, and full graphs
for uniform-decode batches (captured by the model runner where the attention backend allows).

All graphs share one memory pool. Pieces copy their activation inputs into shared static
buffers, so a graph replays at the addresses it was captured with. While one batch size is
captured every piece's outputs stay alive (a later piece may still read them); afterwards they
are kept only as non-owning aliases, so the pool memory is reused by the next size's graphs —
memory for all sizes is that of one forward at the largest size.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


def default_capture_sizes(max_size: int = 512) -> list[int]:
    """Batch sizes of the full-model decode graphs: fine-grained, since a decode step's cost
    is in the padded batch's weight reads and its attention."""
    sizes = [1, 2, 4] + list(range(8, 257, 8)) + list(range(272, 513, 16))
    return [s for s in sizes if s <= max_size]


def default_piecewise_sizes(max_size: int = 512) -> list[int]:
    """Token counts of the piecewise graphs, which serve prefill and mixed batches: powers of
    two up to 256, where a step's GEMMs cost about the same for any token count (they are
    bound by the weight reads), then steps of 64. A third as many sizes as the decode graphs:
    each size captures a graph per compiled piece, so this list sets most of capture time."""
    sizes = [1 << i for i in range(9)] + list(range(320, 513, 64))
    return [s for s in sizes if s <= max_size]


@contextlib.contextmanager
def capturing(graph: torch.cuda.CUDAGraph, pool: Any, stream: torch.cuda.Stream) -> Iterator[None]:
    """Capture into `graph` on `stream`. Unlike `torch.cuda.graph`, no device sync and no
    `empty_cache()` per graph: with thousands of piece graphs per start those dominated capture
    time, and the pool's memory is meant to be reused from one graph to the next."""
    stream.wait_stream(torch.cuda.current_stream(stream.device))
    with torch.cuda.stream(stream):
        graph.capture_begin(pool=pool)
        try:
            yield
        finally:
            graph.capture_end()
    torch.cuda.current_stream(stream.device).wait_stream(stream)


class _DeviceBytes:
    """A raw device range, exposed through `__cuda_array_interface__` to alias it."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "version": 3,
        }


def weak_alias(t: torch.Tensor) -> torch.Tensor:
    """A tensor at t's address that does not keep t's memory allocated."""
    storage = t.untyped_storage()
    raw = torch.as_tensor(_DeviceBytes(storage.data_ptr(), storage.nbytes()), device=t.device)
    return raw.view(t.dtype).as_strided(t.shape, t.stride(), t.storage_offset())


def _alias_all(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return weak_alias(out)
    if isinstance(out, tuple | list):
        return type(out)(_alias_all(o) for o in out)
    return out


@dataclass(frozen=True)
class _Mode:
    num_tokens: int  # piece wrappers replay (or capture) graphs of this size
    capturing: bool = False


_MODE: contextvars.ContextVar[_Mode | None] = contextvars.ContextVar(
    "compiled_llm_piecewise_mode", default=None
)


@contextlib.contextmanager
def piecewise_graphs(num_tokens: int, capturing: bool = False) -> Iterator[None]:
    """Within this block, compiled pieces run as graphs of `num_tokens` (the padded size)."""
    token = _MODE.set(_Mode(num_tokens, capturing))
    try:
        yield
    finally:
        _MODE.reset(token)


@dataclass
class GraphPool:
    """What all graphs of one model share: the memory pool, static input buffers, counters."""

    device: torch.device
    max_tokens: int
    static_ptrs: set[int]  # parameters and other tensors whose address never changes
    pool: Any = None
    stream: Any = None
    replays: int = 0
    _buffers: dict[tuple[Any, ...], torch.Tensor] = field(default_factory=dict)
    _alive: list[tuple[dict[int, Any], int, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(self.device)  # every capture runs on it

    def capture(self, graph: torch.cuda.CUDAGraph) -> contextlib.AbstractContextManager[None]:
        return capturing(graph, self.pool, self.stream)

    def input_buffer(self, slot: int, like: torch.Tensor) -> torch.Tensor:
        """A static buffer with `like`'s layout (strides included: compiled pieces check them;
        e.g. cos/sin arrive as strided halves of one table)."""
        key = (slot, like.dtype, tuple(like.shape[1:]), like.stride())
        buf = self._buffers.get(key)
        if buf is None:
            shape = (self.max_tokens, *like.shape[1:])
            buf = torch.empty_strided(shape, like.stride(), dtype=like.dtype, device=self.device)
            self._buffers[key] = buf
        return buf[: like.shape[0]]

    def keep_alive(self, table: dict[int, Any], size: int, outputs: Any) -> None:
        self._alive.append((table, size, outputs))

    def release(self) -> None:
        """End of one size's capture: outputs become aliases, their memory reusable."""
        for table, size, outputs in self._alive:
            graph, statics, _ = table[size]
            table[size] = (graph, statics, _alias_all(outputs))
        self._alive.clear()

    def is_activation(self, a: Any, num_tokens: int) -> bool:
        return (
            isinstance(a, torch.Tensor)
            and a.dim() >= 1
            and a.shape[0] == num_tokens
            and a.data_ptr() not in self.static_ptrs
        )


class PiecewiseGraph(nn.Module):
    """Wraps one compiled piece: eager outside piecewise mode, else replay the graph of the
    current size (capturing it first when the runner is capturing)."""

    def __init__(self, piece: nn.Module, shared: GraphPool) -> None:
        super().__init__()
        self.piece = piece
        self.shared = shared
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, list[torch.Tensor | None], Any]] = {}

    def forward(self, *args: Any) -> Any:
        mode = _MODE.get()
        if mode is None:
            return self.piece(*args)
        n = mode.num_tokens
        entry = self.graphs.get(n)
        if entry is None:
            return self._capture(n, args) if mode.capturing else self.piece(*args)
        graph, statics, outputs = entry
        for buf, a in zip(statics, args):
            if buf is not None:
                buf.copy_(a, non_blocking=True)
        graph.replay()
        self.shared.replays += 1
        return outputs

    def _capture(self, n: int, args: tuple[Any, ...]) -> Any:
        statics: list[torch.Tensor | None] = []
        call_args = []
        for slot, a in enumerate(args):
            if self.shared.is_activation(a, n):
                buf = self.shared.input_buffer(slot, a)
                buf.copy_(a)
                statics.append(buf)
                call_args.append(buf)
            else:
                statics.append(None)
                call_args.append(a)
        self.piece(*call_args)  # warm-up: first launches may autotune or allocate
        graph = torch.cuda.CUDAGraph()
        with self.shared.capture(graph):
            outputs = self.piece(*call_args)
        self.graphs[n] = (graph, statics, outputs)
        self.shared.keep_alive(self.graphs, n, outputs)
        return outputs
