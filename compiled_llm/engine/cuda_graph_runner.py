"""-O2: run steps as CUDA-graph replays.

Steps are padded up to a capture size. Uniform-decode batches replay one full-model graph when
the attention backend allows it; other batches run the compiled pieces as piecewise graphs with
attention eager between them; batches above the largest size run eagerly. The two kinds have
their own sizes (`default_capture_sizes`, `default_piecewise_sizes`) unless
`cudagraph_capture_sizes` is given, which then sets both.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from compiled_llm.attention_backends.base import AttentionInputs, CudaGraphSupport
from compiled_llm.compilation.cuda_graphs import (
    GraphPool,
    default_capture_sizes,
    default_piecewise_sizes,
    piecewise_graphs,
)
from compiled_llm.compilation.graph_cache import model_tensors
from compiled_llm.forward_context import ForwardContext, set_forward_context

if TYPE_CHECKING:
    from compiled_llm.engine.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class CudaGraphRunner:
    def __init__(self, runner: ModelRunner, pool: GraphPool) -> None:
        self.runner = runner
        self.pool = pool
        cc = runner.config.compilation_config
        sc = runner.config.scheduler_config
        given = cc.cudagraph_capture_sizes
        self.piecewise_sizes = sorted(
            s
            for s in set(given or default_piecewise_sizes())
            if s <= min(sc.max_num_batched_tokens, pool.max_tokens)
        )
        full_ok = runner.backend.cudagraph_support is not CudaGraphSupport.NEVER
        self.decode_sizes = sorted(
            s
            for s in set(given or default_capture_sizes())
            if full_ok and s <= min(sc.max_num_seqs, sc.max_num_batched_tokens)
        )
        # Made in capture(), under inference mode like every step's inputs: Dynamo guards on
        # the dispatch keys, so a tensor made outside inference mode would force a recompile.
        self.static_ids = torch.empty(0, dtype=torch.int64)
        self.static_positions = self.static_ids
        self.full: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.full_replays = 0
        self.capture_seconds = 0.0
        self.piecewise_capture_seconds = 0.0  # of capture_seconds
        self._piecewise_captured = False

    @property
    def piecewise_replays(self) -> int:
        return self.pool.replays

    def padded_size(self, num_tokens: int, uniform_decode: bool) -> int | None:
        """The graph size a step of `num_tokens` runs at, or None (eager)."""
        for sizes in (self.decode_sizes if uniform_decode else [], self.piecewise_sizes):
            i = bisect.bisect_left(sizes, num_tokens)
            if i < len(sizes):
                return sizes[i]
        return None

    def _context(self, metadata: Any) -> ForwardContext:
        r = self.runner
        return ForwardContext(r.backend, r.kv_caches, metadata)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every graph: the piecewise ones unless KV sizing has already (they hold no
        KV-cache address), then the full decode graphs, which read the KV cache in place."""
        self.capture_piecewise()
        start = time.perf_counter()
        self.prepare_full_graphs()  # the backend's buffers for this KV cache
        for b in reversed(self.decode_sizes):
            self.full[b] = self.capture_full_graph(b)
        torch.cuda.synchronize(self.runner.device)
        # Steady state starts, like KV sizing's activation profile, from an empty default pool.
        torch.cuda.empty_cache()
        full_seconds = time.perf_counter() - start
        self.capture_seconds = self.piecewise_capture_seconds + full_seconds
        logger.info(
            "captured %d piecewise sizes in %.2f s and %d full decode graphs in %.2f s",
            len(self.piecewise_sizes),
            self.piecewise_capture_seconds,
            len(self.full),
            full_seconds,
        )

    @torch.inference_mode()
    def capture_piecewise(self) -> None:
        """Piecewise graphs at every size, once. Attention runs eagerly between them, so they do
        not depend on the KV cache and may be captured before it is allocated."""
        if self._piecewise_captured:
            return
        r = self.runner
        start = time.perf_counter()
        largest_decode = max(self.decode_sizes, default=1)
        self.static_ids = torch.zeros(largest_decode, dtype=torch.int64, device=r.device)
        self.static_positions = torch.zeros_like(self.static_ids)
        self.pool.static_ptrs = {t.data_ptr() for t in model_tensors(r.model).values()}
        # Captures allocate from the graph pool, which cannot use memory the default pool caches
        # (e.g. weights freed by gemm_merge's re-pointing): hand that back to the driver once.
        torch.cuda.empty_cache()
        self.prepare_full_graphs()
        for n in reversed(self.piecewise_sizes):  # largest first: later sizes fit in its memory
            ids, pos, attn = r.dummy_inputs(n, num_reqs=1)
            metadata = r.backend.build_metadata(attn)
            with set_forward_context(self._context(metadata)), piecewise_graphs(n, capturing=True):
                r.forward_fn(ids, pos)
            self.pool.release()
        torch.cuda.synchronize(r.device)
        self.piecewise_capture_seconds = time.perf_counter() - start
        self._piecewise_captured = True

    @torch.inference_mode()
    def prepare_full_graphs(self) -> None:
        """(Re)allocate the attention backend's capture buffers for the KV cache now in place."""
        r = self.runner
        largest = max(self.piecewise_sizes + self.decode_sizes, default=0)
        r.backend.prepare_for_capture(
            max_num_reqs=max(r.config.scheduler_config.max_num_seqs, largest),
            max_num_tokens=largest,
        )

    @torch.inference_mode()
    def capture_full_graph(self, b: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The full-model graph of a uniform-decode batch of `b` and its output; it reads the
        KV cache at the address it has now. Needs `capture_piecewise` (the static inputs) and
        `prepare_full_graphs` first."""
        r = self.runner
        _, _, attn = r.dummy_inputs(b, num_reqs=b)
        ids, pos = self.static_ids[:b], self.static_positions[:b]
        metadata = r.backend.build_metadata(attn)
        with set_forward_context(self._context(metadata)):
            r.forward_fn(ids, pos)  # warm-up outside the graph
            graph = torch.cuda.CUDAGraph()
            with self.pool.capture(graph):
                hidden = r.forward_fn(ids, pos)
        return graph, hidden

    def run(
        self, ids: torch.Tensor, positions: torch.Tensor, attn: AttentionInputs, metadata: Any
    ) -> torch.Tensor:
        n = ids.shape[0]
        full = self.full.get(n)
        if full is not None and attn.is_uniform_decode and attn.num_reqs == attn.num_tokens:
            self.static_ids[:n].copy_(ids, non_blocking=True)
            self.static_positions[:n].copy_(positions, non_blocking=True)
            graph, hidden = full
            graph.replay()
            self.full_replays += 1
            return hidden
        piecewise = n in self.piecewise_sizes and not torch.cuda.is_current_stream_capturing()
        mode = piecewise_graphs(n) if piecewise else contextlib.nullcontext()
        with set_forward_context(self._context(metadata)), mode:
            return self.runner.forward_fn(ids, positions)
