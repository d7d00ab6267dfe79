"""Paged attention through FlashInfer (flashinfer-python 0.6.18.post1, the optional `gpu` extra).

Per step, outside the graph, `build_metadata` turns the batch into FlashInfer's CSR page lists and
calls `plan()` on a decode wrapper (every query has one token) or on the prefill wrapper (any other
batch, mixed decode + prefill included); `attend` only calls `run()`. Batches the runner pads to a
full CUDA graph's request count (`AttentionInputs.num_padded_reqs`: decode batches, and speculative
verification batches of at most 1 + k query tokens per request) use one CUDA-graph wrapper per
padded request count, a decode wrapper or a prefill one, whose index buffers we own and `plan()`
refills each step (FlashInfer's graph mode fixes a wrapper's batch size; padding requests get no
query tokens).

The KV write uses our Triton slot-mapping kernel, not `flashinfer.page.append_paged_kv_cache`:
the slot mapping is what the scheduler produces (append would need batch indices and positions
rebuilt every step), padding slots (-1) are skipped by the kernel, and the same kernel, with its
RoPE-fused variant, serves both GPU backends, so the compiler's RoPE+write fusion applies to both.

Sliding windows and logits soft-caps go to `plan()` (window_left = window - 1: FlashInfer's left
bound is inclusive, HF's exclusive; logits_soft_cap as is). One plan serves every layer of a step,
so a model whose layers differ in them (Gemma 2's alternating local and global layers) is refused
(`refusal`); `auto` then picks Triton. Untested on CUDA so far.

An FP8 KV cache is planned with `kv_data_type` E4M3 and read with FlashInfer's default k/v scales
of 1, matching what our write kernel stores (saturated, unscaled); fa2 prefill only.

FlashInfer JIT-compiles its kernels with nvcc on first use; they are cached under
FLASHINFER_WORKSPACE_BASE, which we point at ~/.cache/compiled_llm/flashinfer unless it is set.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault(
    "FLASHINFER_WORKSPACE_BASE", str(Path.home() / ".cache" / "compiled_llm" / "flashinfer")
)

import flashinfer  # noqa: E402  (needs the variable above at import)
import torch  # noqa: E402

from compiled_llm.attention_backends.base import (  # noqa: E402
    FULL_ATTENTION,
    AttentionBackend,
    AttentionInputs,
    AttentionSpec,
    CudaGraphSupport,
    LayerAttention,
)
from compiled_llm.attention_backends.flashinfer_sizing import (  # noqa: E402
    decode_graph_workspace_bytes,
    graph_workspace_bytes,
    workspace_bytes,
)
from compiled_llm.attention_backends.triton_kernels import (  # noqa: E402
    flatten_block_table,
    rope_and_write_kv_per_token,
    write_kv,
)
from compiled_llm.attention_backends.triton_kernels.staging import (  # noqa: E402
    StepBuffers,
)
from compiled_llm.envs import Envs  # noqa: E402

logger = logging.getLogger(__name__)

_announced = False


def _announce_jit() -> None:
    """Say once per process that the first plan may compile (or load) kernels, and where."""
    global _announced
    if _announced:
        return
    _announced = True
    cache = Path(os.environ["FLASHINFER_WORKSPACE_BASE"]) / ".cache" / "flashinfer"
    if cache.is_dir() and any(cache.rglob("*.so")):
        logger.info("FlashInfer kernels compiled earlier are cached in %s", cache)
    else:
        logger.warning(
            "FlashInfer is compiling its kernels with nvcc; first use takes ~30 s, cached in %s",
            cache,
        )


@dataclass(frozen=True)
class FlashInferMetadata:
    wrapper: Any  # the planned BatchDecode/BatchPrefill wrapper
    num_rows: int  # query rows run() takes (requests for decode, tokens for prefill)
    slot_mapping: torch.Tensor


@dataclass(frozen=True)
class _GraphIndexBuffers:
    """Caller-owned plan buffers shared by all CUDA-graph wrappers (run one at a time)."""

    qo_indptr: torch.Tensor  # [max_num_reqs + 1], prefill (verification) wrappers only
    indptr: torch.Tensor  # [max_num_reqs + 1]
    indices: torch.Tensor  # [max_num_reqs * max_pages_per_req]
    last_page_len: torch.Tensor  # [max_num_reqs]


class FlashInferAttentionBackend(AttentionBackend):
    name = "flashinfer"
    cudagraph_support = CudaGraphSupport.ALWAYS
    accepts_fused_rope_kv_write = True
    features = frozenset({"sliding_window", "logits_soft_cap"})

    @classmethod
    def refusal(cls, spec: AttentionSpec) -> str | None:
        # The prefill kernels tile head_dim in 16-wide MMAs and have no valid tile below four of
        # them (prefill.cuh: KernelTraits::IsInvalid); smaller heads fail at the first prefill.
        if spec.head_dim < 64 or spec.head_dim % 16:
            return (
                f"needs head_dim a multiple of 16 and at least 64; this model's is {spec.head_dim}"
            )
        if len(set(spec.layers)) > 1:
            return (
                "plans one attention variant per step, and this model's layers differ in "
                "sliding_window / logits_soft_cap"
            )
        return super().refusal(spec)

    def __init__(
        self,
        spec: AttentionSpec,
        prefill_backend: str | None = None,
        decode_tensor_cores: bool | None = None,
    ) -> None:
        super().__init__(spec)
        if spec.device.type != "cuda":
            raise ValueError("the flashinfer attention backend needs a CUDA device")
        self._layer = spec.layers[0] if spec.layers else FULL_ATTENTION  # every layer's
        self.prefill_backend = prefill_backend or Envs.read().flashinfer_prefill_backend
        if self.prefill_backend not in ("fa2", "fa3"):
            raise ValueError(
                "the FlashInfer prefill backend (COMPILED_LLM_FLASHINFER_PREFILL_BACKEND) must be "
                f"fa2 or fa3, got {self.prefill_backend}"
            )
        if spec.fp8_kv and self.prefill_backend != "fa2":
            raise ValueError(
                "an FP8 KV cache with a bf16/fp16 query runs on FlashInfer's fa2 prefill only "
                "(COMPILED_LLM_FLASHINFER_PREFILL_BACKEND=fa2)"
            )
        group = spec.num_heads // spec.num_kv_heads
        # Tensor-core decode (FlashInfer's prefill kernel) wins once several heads share a KV head.
        self.decode_tensor_cores = (
            group >= 4 if decode_tensor_cores is None else decode_tensor_cores
        )
        self._num_sms = torch.cuda.get_device_properties(spec.device).multi_processor_count
        size = workspace_bytes(spec.num_heads, spec.num_kv_heads, spec.head_dim, self._num_sms)
        self._workspace = torch.empty(0, dtype=torch.uint8, device=spec.device)
        self._reserve_workspace(size)  # also makes the eager wrappers
        self._buffers: StepBuffers | None = None
        self._graph_index: _GraphIndexBuffers | None = None
        self._graph_decode: dict[int, Any] = {}
        self._graph_prefill: dict[int, Any] = {}
        self._num_blocks: int | None = None  # pool size, bounds a request's pages
        self._planned: dict[int, torch.cuda.Event] = {}  # id(wrapper) -> after its last plan

    def _reserve_workspace(self, nbytes: int) -> None:
        """Grow the float workspace to at least `nbytes`, with new eager wrappers on it. Graph
        wrappers made before keep the buffer they were made with, which was large enough for
        their plans (graphs are captured largest first, so this grows once per kind)."""
        if nbytes <= self._workspace.numel():
            return
        if self._workspace.numel():
            logger.info(
                "FlashInfer workspace %d -> %d MiB (a CUDA-graph plan of many requests)",
                self._workspace.numel() >> 20,
                nbytes >> 20,
            )
        self._workspace = torch.zeros(nbytes, dtype=torch.uint8, device=self.spec.device)
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self._workspace, "NHD", backend=self.prefill_backend
        )
        self._decode = self._decode_wrapper()

    def allocate_kv_caches(self, num_blocks: int, num_layers: int) -> list[torch.Tensor]:
        self._num_blocks = num_blocks
        return super().allocate_kv_caches(num_blocks, num_layers)

    def _decode_wrapper(self, batch_size: int | None = None) -> Any:
        kwargs: dict[str, Any] = {"use_tensor_cores": self.decode_tensor_cores}
        if self.decode_tensor_cores:
            kwargs["backend"] = "fa2"
        if batch_size is not None:
            assert self._graph_index is not None
            gi = self._graph_index
            kwargs.update(
                use_cuda_graph=True,
                paged_kv_indptr_buffer=gi.indptr[: batch_size + 1],
                paged_kv_indices_buffer=gi.indices,
                paged_kv_last_page_len_buffer=gi.last_page_len[:batch_size],
            )
        return flashinfer.BatchDecodeWithPagedKVCacheWrapper(self._workspace, "NHD", **kwargs)

    # --- per step, outside the graph ------------------------------------------------------------
    def prepare_for_capture(self, max_num_reqs: int, max_num_tokens: int) -> None:
        dev = self.spec.device
        self._buffers = StepBuffers(max_num_reqs, max_num_tokens, dev, self._num_blocks)
        self._graph_index = None  # graphs captured before this are invalid from now on
        self._graph_decode = {}
        self._graph_prefill = {}

    def _graph_wrapper(self, batch_size: int, width: int, decode: bool, rows: int) -> Any:
        """The CUDA-graph wrapper for this padded request count, a decode one or (verification
        batches) a prefill one of `rows` query tokens (created on first use, on a workspace
        large enough for its plans)."""
        assert self._buffers is not None
        if self._graph_index is None:
            n, dev = self._buffers.max_num_reqs, self.spec.device
            pages = self._buffers.max_blocks_per_req or width
            self._graph_index = _GraphIndexBuffers(
                qo_indptr=torch.zeros(n + 1, dtype=torch.int32, device=dev),
                indptr=torch.zeros(n + 1, dtype=torch.int32, device=dev),
                indices=torch.zeros(n * pages, dtype=torch.int32, device=dev),
                last_page_len=torch.zeros(n, dtype=torch.int32, device=dev),
            )
        if self._graph_index.indices.numel() < batch_size * width:
            raise ValueError(
                "more pages than staged for CUDA graphs: allocate the KV cache through the "
                "backend (allocate_kv_caches) before prepare_for_capture"
            )
        cached = self._graph_decode if decode else self._graph_prefill
        if batch_size not in cached:
            s = self.spec
            if decode and not self.decode_tensor_cores:  # FlashInfer's CUDA-core decode kernel
                need = decode_graph_workspace_bytes(
                    s.num_heads, s.head_dim, self._num_sms, batch_size
                )
            else:  # its prefill kernel (tensor-core decode, verification batches)
                need = graph_workspace_bytes(
                    s.num_heads, s.num_kv_heads, s.head_dim, self._num_sms, batch_size, rows
                )
            self._reserve_workspace(need)
            if decode:
                cached[batch_size] = self._decode_wrapper(batch_size)
            else:
                gi = self._graph_index
                cached[batch_size] = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
                    self._workspace,
                    "NHD",
                    backend=self.prefill_backend,
                    use_cuda_graph=True,
                    qo_indptr_buf=gi.qo_indptr[: batch_size + 1],
                    paged_kv_indptr_buf=gi.indptr[: batch_size + 1],
                    paged_kv_indices_buf=gi.indices,
                    paged_kv_last_page_len_buf=gi.last_page_len[:batch_size],
                )
        return cached[batch_size]

    def build_metadata(self, inputs: AttentionInputs) -> FlashInferMetadata:
        _announce_jit()
        s, dev = self.spec, self.spec.device
        bs = s.block_size
        r, n_pad = inputs.num_reqs, inputs.slot_mapping.shape[0]
        slot_mapping = inputs.slot_mapping
        is_decode = inputs.is_decode
        graph = False
        if self._buffers is not None and self._buffers.fits(inputs):
            slot_mapping = self._buffers.slot_mapping[:n_pad]
            slot_mapping.copy_(inputs.slot_mapping, non_blocking=True)
            if is_decode:
                graph = n_pad <= self._buffers.max_num_reqs
            else:
                graph = inputs.num_padded_reqs is not None
        if not graph:
            batch = r
        elif is_decode:
            batch = n_pad
        else:
            assert inputs.num_padded_reqs is not None
            batch = inputs.num_padded_reqs

        # Host-side CSR description; padded requests get one page (page 0, length 1).
        seq_lens = inputs.seq_lens_cpu[:r].to(torch.int32)
        pages = torch.ones(batch, dtype=torch.int32)
        last = torch.ones(batch, dtype=torch.int32)
        pages[:r] = (seq_lens + bs - 1) // bs
        last[:r] = seq_lens - (pages[:r] - 1) * bs
        indptr = torch.zeros(batch + 1, dtype=torch.int32)
        torch.cumsum(pages, 0, out=indptr[1:])
        total = int(indptr[-1])
        indices = torch.empty(max(total, 1), dtype=torch.int32, device=dev)
        flatten_block_table(inputs.block_table, indptr.to(dev, non_blocking=True), r, indices)
        indices = indices[:total]

        window = self._layer.sliding_window
        common: dict[str, Any] = {
            "q_data_type": s.dtype,
            "kv_data_type": s.cache_dtype,  # FP8: read with k/v scales of 1 (run()'s default)
            "sm_scale": s.scale,
            "window_left": -1 if window is None else window - 1,
            "logits_soft_cap": self._layer.logits_soft_cap,
        }
        if is_decode:
            if graph:
                wrapper = self._graph_wrapper(
                    batch, inputs.block_table.shape[1], decode=True, rows=batch
                )
            else:
                wrapper = self._decode
            with self._planning(wrapper):
                wrapper.plan(
                    indptr, indices, last, s.num_heads, s.num_kv_heads, s.head_dim, bs, **common
                )
            return FlashInferMetadata(wrapper, batch, slot_mapping)
        # Padding requests (a verification graph's) have no query tokens.
        qo_indptr = torch.full((batch + 1,), inputs.num_tokens, dtype=torch.int32)
        qo_indptr[: r + 1] = inputs.query_start_loc_cpu[: r + 1]
        if graph:
            rows = n_pad
            wrapper = self._graph_wrapper(
                batch, inputs.block_table.shape[1], decode=False, rows=rows
            )
        else:
            wrapper, rows = self._prefill, inputs.num_tokens
        with self._planning(wrapper):
            wrapper.plan(
                qo_indptr,
                indptr,
                indices,
                last,
                s.num_heads,
                s.num_kv_heads,
                s.head_dim,
                bs,
                causal=True,
                **common,
            )
        return FlashInferMetadata(wrapper, rows, slot_mapping)

    @contextlib.contextmanager
    def _planning(self, wrapper: Any) -> Iterator[None]:
        """`plan()` writes the schedule into the wrapper's pinned host buffer, then copies it to
        the device asynchronously. With async scheduling the next step's plan can come before
        the device has run that copy, so wait for it first (it is queued right after the step
        before, so the wait is almost always already over)."""
        done = self._planned.get(id(wrapper))
        if done is not None:
            done.synchronize()
        yield
        event = torch.cuda.Event()
        event.record()
        self._planned[id(wrapper)] = event

    # --- inside the graph -----------------------------------------------------------------------
    def write_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: FlashInferMetadata,
    ) -> None:
        write_kv(k, v, kv_cache, metadata.slot_mapping)

    def rope_write_kv(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: FlashInferMetadata,
    ) -> torch.Tensor:
        return rope_and_write_kv_per_token(q, k, v, cos, sin, kv_cache, metadata.slot_mapping)

    def attend(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: FlashInferMetadata,
        out: torch.Tensor,
        layer: LayerAttention = FULL_ATTENTION,
    ) -> None:
        if layer != self._layer:
            raise ValueError(
                f"the flashinfer backend was planned for {self._layer}, a layer asked for {layer}"
            )
        n = metadata.num_rows
        metadata.wrapper.run(q[:n], kv_cache, out=out[:n])
