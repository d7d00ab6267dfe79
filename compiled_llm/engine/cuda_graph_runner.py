"""-O2: run steps as CUDA-graph replays.

Steps are padded up to a capture size. Uniform-decode batches replay one full-model graph when
the attention backend allows it; other batches run the compiled pieces as piecewise graphs with
attention eager between them; batches above the largest size run eagerly. The two kinds have
their own sizes (`default_capture_sizes`, `default_piecewise_sizes`) unless
`cudagraph_capture_sizes` is given, which then sets both. Both kinds are `CudaGraphWrapper`s;
this module decides which one a step uses and when they are captured.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.utils._pytree as pytree
from torch import nn

from compiled_llm.attention_backends.base import (
    AttentionBackend,
    AttentionInputs,
    CudaGraphSupport,
)
from compiled_llm.compilation.cuda_graphs import (
    CudaGraphWrapper,
    GraphMode,
    GraphPool,
    cuda_graph_mode,
    default_capture_sizes,
    default_piecewise_sizes,
)
from compiled_llm.compilation.graph_cache import model_tensors
from compiled_llm.config import CompilationConfig, SchedulerConfig
from compiled_llm.forward_context import ForwardContext, set_forward_context

logger = logging.getLogger(__name__)


class CaptureHost(Protocol):
    """What capturing needs from the model runner: synthetic batches and their context."""

    @property
    def device(self) -> torch.device: ...
    @property
    def backend(self) -> AttentionBackend: ...
    @property
    def model(self) -> nn.Module: ...

    def dummy_inputs(
        self, num_tokens: int, num_reqs: int
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionInputs]: ...

    def forward_context(self, metadata: Any) -> ForwardContext: ...


def output_bytes(out: Any) -> int:
    """Bytes of the storages a graph's output holds (one tensor or a tuple of them)."""
    return sum(t.untyped_storage().nbytes() for t in pytree.tree_leaves(out))


class CudaGraphRunner:
    def __init__(
        self,
        host: CaptureHost,
        forward_fn: Callable[[torch.Tensor, torch.Tensor], Any],
        pool: GraphPool,
        compilation: CompilationConfig,
        scheduler: SchedulerConfig,
    ) -> None:
        self.host = host
        self.pool = pool
        given = compilation.cudagraph_capture_sizes
        self.piecewise_sizes = sorted(
            s
            for s in set(given or default_piecewise_sizes())
            if s <= min(scheduler.max_num_batched_tokens, pool.max_tokens)
        )
        full_ok = host.backend.cudagraph_support is not CudaGraphSupport.NEVER
        self.decode_sizes = sorted(
            s
            for s in set(given or default_capture_sizes())
            if full_ok and s <= min(scheduler.max_num_seqs, scheduler.max_num_batched_tokens)
        )
        self.max_num_seqs = scheduler.max_num_seqs
        # Every step calls the forward through this wrapper: it replays a full graph under a
        # FULL dispatch and runs the forward (whose pieces replay) under a PIECEWISE one.
        self.forward = CudaGraphWrapper(forward_fn, pool, GraphMode.FULL)
        self.capture_seconds = 0.0
        self.piecewise_capture_seconds = 0.0  # of capture_seconds
        self._piecewise_captured = False

    @property
    def full_replays(self) -> int:
        return self.pool.replays[GraphMode.FULL]

    @property
    def piecewise_replays(self) -> int:
        return self.pool.replays[GraphMode.PIECEWISE]

    def padded_size(self, num_tokens: int, uniform_decode: bool) -> int | None:
        """The graph size a step of `num_tokens` runs at, or None (eager)."""
        for sizes in (self.decode_sizes if uniform_decode else [], self.piecewise_sizes):
            i = bisect.bisect_left(sizes, num_tokens)
            if i < len(sizes):
                return sizes[i]
        return None

    def run(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionInputs,
        context: ForwardContext,
    ) -> Any:
        """The forward's output for this step (see `capture_full_graph`), from a graph where one
        fits."""
        n = ids.shape[0]
        mode: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        # A uniform-decode batch padded to a captured size (padding tokens are not requests).
        if (
            n in self.forward.entries
            and attn.is_uniform_decode
            and attn.num_reqs == attn.num_tokens
        ):
            mode = cuda_graph_mode(GraphMode.FULL, n)
        elif n in self.piecewise_sizes and not torch.cuda.is_current_stream_capturing():
            mode = cuda_graph_mode(GraphMode.PIECEWISE, n)
        with set_forward_context(context), mode:
            return self.forward(ids, positions)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every graph: the piecewise ones unless KV sizing has already (they hold no
        KV-cache address), then the full decode graphs, which read the KV cache in place."""
        self.capture_piecewise()
        start = time.perf_counter()
        self.prepare_full_graphs()  # the backend's buffers for this KV cache
        for b in reversed(self.decode_sizes):
            self.capture_full_graph(b)
        torch.cuda.synchronize(self.host.device)
        # Steady state starts, like KV sizing's activation profile, from an empty default pool.
        torch.cuda.empty_cache()
        full_seconds = time.perf_counter() - start
        self.capture_seconds = self.piecewise_capture_seconds + full_seconds
        logger.info(
            "captured %d piecewise sizes in %.2f s and %d full decode graphs in %.2f s",
            len(self.piecewise_sizes),
            self.piecewise_capture_seconds,
            len(self.forward.entries),
            full_seconds,
        )

    @torch.inference_mode()
    def capture_piecewise(self) -> None:
        """Piecewise graphs at every size, once. Attention runs eagerly between them, so they do
        not depend on the KV cache and may be captured before it is allocated."""
        if self._piecewise_captured:
            return
        h = self.host
        start = time.perf_counter()
        self.pool.static_ptrs = {t.data_ptr() for t in model_tensors(h.model).values()}
        # Captures allocate from the graph pool, which cannot use memory the default pool caches
        # (e.g. weights freed by gemm_merge's re-pointing): hand that back to the driver once.
        torch.cuda.empty_cache()
        self.prepare_full_graphs()
        for n in reversed(self.piecewise_sizes):  # largest first: later sizes fit in its memory
            ids, pos, attn = h.dummy_inputs(n, num_reqs=1)
            context = h.forward_context(h.backend.build_metadata(attn))
            with set_forward_context(context), cuda_graph_mode(GraphMode.PIECEWISE, n, True):
                self.forward(ids, pos)
            self.pool.release()
        torch.cuda.synchronize(h.device)
        self.piecewise_capture_seconds = time.perf_counter() - start
        self._piecewise_captured = True

    @torch.inference_mode()
    def prepare_full_graphs(self) -> None:
        """(Re)allocate the attention backend's capture buffers for the KV cache now in place."""
        largest = max(self.piecewise_sizes + self.decode_sizes, default=0)
        self.host.backend.prepare_for_capture(
            max_num_reqs=max(self.max_num_seqs, largest), max_num_tokens=largest
        )

    @torch.inference_mode()
    def capture_full_graph(self, b: int) -> Any:
        """Capture the full-model graph of a uniform-decode batch of `b`; returns its output (a
        tensor, or a tuple of them where the forward returns more, e.g. eagle3's auxiliary
        hidden states). It reads the KV cache at the address it has now. Needs
        `capture_piecewise` (the model's static tensors) and `prepare_full_graphs` first."""
        h = self.host
        ids, pos, attn = h.dummy_inputs(b, num_reqs=b)
        context = h.forward_context(h.backend.build_metadata(attn))
        with set_forward_context(context), cuda_graph_mode(GraphMode.FULL, b, capturing=True):
            return self.forward(ids, pos)

    def measure_memory(self, footprint: Callable[[], tuple[int, int]]) -> int:
        """Bytes all CUDA graphs will take, capturing what can be before the KV cache exists:
        the piecewise graphs, captured and kept, and the two largest full decode graphs,
        captured and dropped (they read the KV cache; later ones reuse the largest one's pool
        memory, captured largest first, and each adds what the second added, at least its
        output, which stays allocated). `footprint` reads two measures of the engine's memory:
        device memory in use, which counts whole allocator segments, and torch-allocated plus
        non-torch bytes, which sees tensors that land in a segment with room (FlashInfer's 8 MiB
        per decode graph did: the first read 0). Each cost is the larger of the two; later
        decode graphs get 2 MiB more each, for the segment they may start."""
        start = footprint()
        self.capture_piecewise()
        sizes = sorted(self.decode_sizes, reverse=True)[:2]
        first = None
        if sizes:
            self.prepare_full_graphs()
            first = self.capture_full_graph(sizes[0])
        after_first = footprint()
        cost = max(a - b for a, b in zip(after_first, start, strict=True))
        if len(sizes) < 2:
            self.drop_full_graphs()
            return cost
        self.capture_full_graph(sizes[1])
        added = max(a - b for a, b in zip(footprint(), after_first, strict=True))
        assert first is not None
        per_graph = max(added, output_bytes(first)) + (2 << 20)
        self.drop_full_graphs()
        return cost + per_graph * (len(self.decode_sizes) - 1)

    def drop_full_graphs(self) -> None:
        self.forward.entries.clear()
