"""CUDA graphs per padded batch size, through one wrapper keyed by (mode, size): piecewise
graphs of the compiled pieces around eager attention, and full graphs of the whole forward for
uniform-decode batches (where the attention backend allows).

All graphs share one memory pool. Wrappers copy their activation inputs into shared static
buffers, so a graph replays at the addresses it was captured with. While one batch size is
captured every piece's outputs stay alive (a later piece may still read them); afterwards they
are kept only as non-owning aliases, so the pool memory is reused by the next size's graphs —
memory for all sizes is that of one forward at the largest size.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compiled_llm.envs import Envs


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


class GraphMode(enum.Enum):
    PIECEWISE = "piecewise"  # each compiled piece a graph, attention eager between them
    FULL = "full"  # the whole forward one graph (uniform-decode batches)


@dataclass
class GraphPool:
    """What all graphs of one model share: the memory pool, static input buffers, counters."""

    device: torch.device
    max_tokens: int
    static_ptrs: set[int]  # parameters and other tensors whose address never changes
    pool: Any = None
    stream: Any = None
    replays: dict[GraphMode, int] = field(default_factory=lambda: dict.fromkeys(GraphMode, 0))
    _buffers: dict[tuple[Any, ...], torch.Tensor] = field(default_factory=dict)
    _alive: list[_Entry] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(self.device)  # every capture runs on it

    def capture(self, graph: torch.cuda.CUDAGraph) -> contextlib.AbstractContextManager[None]:
        return capturing(graph, self.pool, self.stream)

    def input_buffer(self, slot: int, like: torch.Tensor) -> torch.Tensor:
        """A static buffer with `like`'s layout (strides included: compiled pieces check them;
        e.g. cos/sin arrive as strided halves of one table). Shared by every graph that takes
        such an argument in this position: graphs replay one at a time, each after its copy."""
        key = (slot, like.dtype, tuple(like.shape[1:]), like.stride())
        buf = self._buffers.get(key)
        if buf is None:
            shape = (self.max_tokens, *like.shape[1:])
            buf = torch.empty_strided(shape, like.stride(), dtype=like.dtype, device=self.device)
            self._buffers[key] = buf
        return buf[: like.shape[0]]

    def keep_alive(self, entry: _Entry) -> None:
        self._alive.append(entry)

    def release(self) -> None:
        """End of one size's piecewise capture: outputs become aliases, their memory reusable."""
        for entry in self._alive:
            entry.outputs = _alias_all(entry.outputs)
        self._alive.clear()

    def is_activation(self, a: Any, num_tokens: int) -> bool:
        return (
            isinstance(a, torch.Tensor)
            and a.dim() >= 1
            and a.shape[0] == num_tokens
            and a.data_ptr() not in self.static_ptrs
        )


@dataclass(frozen=True)
class _Dispatch:
    mode: GraphMode
    size: int  # the padded token count whose graph replays (or is captured)
    capturing: bool


_DISPATCH: contextvars.ContextVar[_Dispatch | None] = contextvars.ContextVar(
    "compiled_llm_cuda_graph_dispatch", default=None
)


@contextlib.contextmanager
def cuda_graph_mode(mode: GraphMode, size: int, capturing: bool = False) -> Iterator[None]:
    """Within this block, wrappers of `mode` replay their graph of `size` (capturing it first
    when `capturing`); wrappers of the other mode run eagerly."""
    token = _DISPATCH.set(_Dispatch(mode, size, capturing))
    try:
        yield
    finally:
        _DISPATCH.reset(token)


@dataclass
class _Entry:
    graph: torch.cuda.CUDAGraph
    buffers: list[torch.Tensor | None]  # per argument: the static buffer it is copied into
    captured: list[Any]  # per argument not copied: its address (tensors) or value at capture
    outputs: Any


class CudaGraphWrapper(nn.Module):
    """Runs `fn` eagerly, or as the CUDA graph of the current dispatch's size when the dispatch
    (`cuda_graph_mode`) names this wrapper's mode. One graph per size, keyed by (mode, size).

    A graph replays at the addresses it was captured with. Arguments whose first dimension is
    the size (activations, token ids) and that are not the model's own tensors are copied into
    static buffers before each replay; every other argument must be what it was at capture. With
    COMPILED_LLM_DEBUG_CUDA_GRAPHS=1 each replay checks that, instead of replaying stale inputs.
    """

    def __init__(self, fn: Callable[..., Any], pool: GraphPool, mode: GraphMode) -> None:
        super().__init__()
        self.fn = fn  # registered as a child when it is a module
        self.pool = pool
        self.mode = mode
        self.check_addresses = Envs.read().debug_cuda_graphs
        self.entries: dict[int, _Entry] = {}
        self.replays = 0  # of this wrapper's graphs (the pool counts all of a mode's)

    def forward(self, *args: Any) -> Any:
        d = _DISPATCH.get()
        if d is None or d.mode is not self.mode:
            return self.fn(*args)
        entry = self.entries.get(d.size)
        if entry is None:
            return self._capture(d.size, args) if d.capturing else self.fn(*args)
        if self.check_addresses:
            self._check(d.size, entry, args)
        for buf, a in zip(entry.buffers, args, strict=True):
            if buf is not None:
                buf.copy_(a, non_blocking=True)
        entry.graph.replay()
        self.replays += 1
        self.pool.replays[self.mode] += 1
        return entry.outputs

    def _capture(self, size: int, args: tuple[Any, ...]) -> Any:
        buffers: list[torch.Tensor | None] = []
        captured: list[Any] = []
        call_args = []
        for slot, a in enumerate(args):
            if self.pool.is_activation(a, size):
                buf = self.pool.input_buffer(slot, a)
                buf.copy_(a)
                buffers.append(buf)
                captured.append(None)
                call_args.append(buf)
            else:
                buffers.append(None)
                captured.append(a.data_ptr() if isinstance(a, torch.Tensor) else a)
                call_args.append(a)
        self.fn(*call_args)  # warm-up: first launches may autotune or allocate
        graph = torch.cuda.CUDAGraph()
        with self.pool.capture(graph):
            outputs = self.fn(*call_args)
        entry = _Entry(graph, buffers, captured, outputs)
        self.entries[size] = entry
        if self.mode is GraphMode.PIECEWISE:
            # A piece's outputs are another piece's inputs: kept while this size is captured,
            # then aliased (`GraphPool.release`). A full graph's output is the step's result.
            self.pool.keep_alive(entry)
        return outputs

    def _check(self, size: int, entry: _Entry, args: tuple[Any, ...]) -> None:
        for slot, (buf, was, a) in enumerate(zip(entry.buffers, entry.captured, args, strict=True)):
            if buf is not None:
                ok = isinstance(a, torch.Tensor) and a.shape[0] == size
                now: Any = tuple(a.shape) if isinstance(a, torch.Tensor) else a
            else:
                now = a.data_ptr() if isinstance(a, torch.Tensor) else a
                ok = now == was
            if not ok:
                raise RuntimeError(
                    f"{self.mode.value} CUDA graph of size {size}: argument {slot} is {now!r}, "
                    f"captured with {was if buf is None else ('size', size)!r}; a replay would "
                    "read the captured input, not this one"
                )
