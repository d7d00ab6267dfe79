"""-O2: run steps as CUDA-graph replays.

Steps are padded up to a capture size. Where the attention backend allows it
(`CudaGraphSupport`), two kinds of batch replay one full-model graph, padded to a captured
request count: decode batches (one query token per request), and, with speculative decoding
verified on this model, verification batches (at most 1 + k query tokens per request: drafting
and non-drafting requests mixed, any k up to the configured one), padded to 1 + k tokens per
request. Other batches run the
compiled pieces as piecewise graphs with attention eager between them; batches above the
largest size run eagerly. Full and piecewise graphs have their own sizes
(`default_capture_sizes`, `default_piecewise_sizes`) unless `cudagraph_capture_sizes` is given,
which then sets both. All are `CudaGraphWrapper`s; this module decides which one a step uses
and when they are captured.
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
        self, num_tokens: int, num_reqs: int, num_padded_reqs: int | None = None
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
        verify_len: int = 1,
        max_verify_reqs: int | None = None,
    ) -> None:
        """`verify_len`: 1 + k where this model verifies k speculative tokens per request (1:
        no verification graphs); `max_verify_reqs`: the most requests a step speculates for
        (SpeculativeConfig.disable_by_batch_size)."""
        self.host = host
        self.pool = pool
        given = compilation.cudagraph_capture_sizes
        self.piecewise_sizes = sorted(
            s
            for s in set(given or default_piecewise_sizes())
            if s <= min(scheduler.max_num_batched_tokens, pool.max_tokens)
        )
        support = host.backend.cudagraph_support
        full_ok = support is not CudaGraphSupport.NEVER
        full_sizes = sorted(set(given or default_capture_sizes())) if full_ok else []
        if support is not CudaGraphSupport.ALWAYS:
            verify_len = 1  # the backend's attention cannot replay verification batches
        max_tokens = min(scheduler.max_num_batched_tokens, pool.max_tokens)
        self.decode_sizes = [s for s in full_sizes if s <= min(scheduler.max_num_seqs, max_tokens)]
        self.verify_len = verify_len
        max_verify = min(scheduler.max_num_seqs, max_verify_reqs or scheduler.max_num_seqs)
        self.verify_sizes = [
            s
            for s in full_sizes
            if verify_len > 1 and s <= max_verify and s * verify_len <= max_tokens
        ]
        self.max_num_seqs = scheduler.max_num_seqs
        # Every step calls the forward through one of these wrappers: it replays a full graph
        # under a FULL dispatch and runs the forward (whose pieces replay) under a PIECEWISE one.
        # Their graphs are keyed by token count, and a verification graph may have as many
        # tokens as a decode graph of other requests, so each kind has its own wrapper.
        self.forward = CudaGraphWrapper(forward_fn, pool, GraphMode.FULL)
        self.verify = CudaGraphWrapper(forward_fn, pool, GraphMode.FULL)
        self.capture_seconds = 0.0
        self.piecewise_capture_seconds = 0.0  # of capture_seconds
        self._piecewise_captured = False

    @property
    def full_replays(self) -> int:
        return self.pool.replays[GraphMode.FULL]

    @property
    def verify_replays(self) -> int:
        """Of `full_replays`, the verification graphs'."""
        return self.verify.replays

    @property
    def piecewise_replays(self) -> int:
        return self.pool.replays[GraphMode.PIECEWISE]

    def padding(
        self, num_tokens: int, num_reqs: int, max_query_len: int
    ) -> tuple[int | None, int | None]:
        """(tokens, requests) a step runs at: a full graph's (requests past `num_reqs` and
        tokens past `num_tokens` are padding), a piecewise size's (requests None), or (None,
        None): eager."""
        if max_query_len == 1 and num_tokens == num_reqs:
            full, per_req = self.decode_sizes, 1
        elif max_query_len <= self.verify_len:
            full, per_req = self.verify_sizes, self.verify_len
        else:
            full, per_req = [], 0
        i = bisect.bisect_left(full, num_reqs)
        if i < len(full):
            return full[i] * per_req, full[i]
        i = bisect.bisect_left(self.piecewise_sizes, num_tokens)
        if i < len(self.piecewise_sizes):
            return self.piecewise_sizes[i], None
        return None, None

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
        # A batch padded to a full graph's request count (`padding`) replays that graph.
        full = self.forward if attn.is_decode else self.verify
        if attn.num_padded_reqs is not None and n in full.entries:
            with set_forward_context(context), cuda_graph_mode(GraphMode.FULL, n):
                return full(ids, positions)
        if n in self.piecewise_sizes and not torch.cuda.is_current_stream_capturing():
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
        for b in reversed(self.verify_sizes):
            self.capture_full_graph(b, verify=True)
        torch.cuda.synchronize(self.host.device)
        # Steady state starts, like KV sizing's activation profile, from an empty default pool.
        torch.cuda.empty_cache()
        full_seconds = time.perf_counter() - start
        self.capture_seconds = self.piecewise_capture_seconds + full_seconds
        logger.info(
            "captured %d piecewise sizes in %.2f s and %d full graphs (%d decode, %d "
            "verification) in %.2f s",
            len(self.piecewise_sizes),
            self.piecewise_capture_seconds,
            len(self.forward.entries) + len(self.verify.entries),
            len(self.forward.entries),
            len(self.verify.entries),
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
        verify_tokens = [b * self.verify_len for b in self.verify_sizes]
        largest = max(self.piecewise_sizes + self.decode_sizes + verify_tokens, default=0)
        self.host.backend.prepare_for_capture(
            max_num_reqs=max(self.max_num_seqs, largest), max_num_tokens=largest
        )

    @torch.inference_mode()
    def capture_full_graph(self, b: int, verify: bool = False) -> Any:
        """Capture the full-model graph of a decode batch of `b` requests, or with `verify` of
        a verification batch of `b` requests of `verify_len` tokens; returns its output (a
        tensor, or a tuple of them where the forward returns more, e.g. eagle3's auxiliary
        hidden states). It reads the KV cache at the address it has now. Needs
        `capture_piecewise` (the model's static tensors) and `prepare_full_graphs` first."""
        h = self.host
        n = b * self.verify_len if verify else b
        ids, pos, attn = h.dummy_inputs(n, num_reqs=b, num_padded_reqs=b)
        context = h.forward_context(h.backend.build_metadata(attn))
        wrapper = self.verify if verify else self.forward
        with set_forward_context(context), cuda_graph_mode(GraphMode.FULL, n, capturing=True):
            return wrapper(ids, pos)

    def measure_memory(self, footprint: Callable[[], tuple[int, int]]) -> int:
        """Bytes all CUDA graphs will take, capturing what can be before the KV cache exists:
        the piecewise graphs, captured and kept, and the two largest full decode graphs,
        captured and dropped (they read the KV cache; later ones reuse the largest one's pool
        memory, captured largest first, and each adds what the second added, at least its
        output, which stays allocated). `footprint` reads two measures of the engine's memory:
        device memory in use, which counts whole allocator segments, and torch-allocated plus
        non-torch bytes, which sees tensors that land in a segment with room (FlashInfer's 8 MiB
        per decode graph did: the first read 0). Each cost is the larger of the two; later
        decode graphs get 2 MiB more each, for the segment they may start. Verification graphs
        are counted like later decode graphs, with an output up to `verify_len` times as
        large."""
        start = footprint()
        self.capture_piecewise()
        sizes = sorted(self.decode_sizes, reverse=True)[:2]
        first = None
        if sizes:
            self.prepare_full_graphs()
            first = self.capture_full_graph(sizes[0])
        after_first = footprint()
        cost = max(a - b for a, b in zip(after_first, start, strict=True))
        added = 0
        if len(sizes) == 2:
            self.capture_full_graph(sizes[1])
            added = max(a - b for a, b in zip(footprint(), after_first, strict=True))
        self.drop_full_graphs()
        if first is None:
            return cost
        out = output_bytes(first)
        per_graph = max(added, out) + (2 << 20)
        # A verification graph's output holds up to verify_len rows per request.
        per_verify = max(added, out * self.verify_len) + (2 << 20)
        return cost + per_graph * (len(self.decode_sizes) - 1) + per_verify * len(self.verify_sizes)

    def drop_full_graphs(self) -> None:
        self.forward.entries.clear()
        self.verify.entries.clear()
