"""Paged attention on compiled-llm's own Triton kernels (`triton_kernels/`).

Per step, `build_metadata` (outside any graph) picks the kernel from host-side values: the split-KV
decode kernel when every query has one token, else the prefill/extend kernel, which handles any
mix. After `prepare_for_capture`, batches that fit are staged into persistent buffers and launched
over padded request counts with a split count that depends only on the padded batch size, so a
captured graph stays correct for any batch of its size: CUDA graphs are supported for every batch.
On CPU the kernels run under TRITON_INTERPRET=1 (tests only). Both kernels take a layer's
sliding window and logits soft-cap.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton

from compiled_llm.attention_backends.base import (
    FULL_ATTENTION,
    AttentionBackend,
    AttentionInputs,
    AttentionSpec,
    CudaGraphSupport,
    LayerAttention,
)
from compiled_llm.attention_backends.triton_kernels import (
    decode_attention,
    partial_numel,
    prefill_attention,
    rope_and_write_kv_per_token,
    write_kv,
)
from compiled_llm.attention_backends.triton_kernels.prefill import prefill_block_q
from compiled_llm.attention_backends.triton_kernels.staging import (
    StagedBatch,
    StepBuffers,
    unstaged,
)

MAX_SPLITS = 64


@dataclass(frozen=True)
class PrefillTiles:
    block_m: int = 128  # query rows per program (tokens x GQA group)
    block_n: int = 32  # keys per iteration
    warps: int = 4
    stages: int = 3


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes; the defaults were measured on an H100 (docs/attention_backends.md)."""

    decode_block_n: int = 64
    decode_warps: int = 4
    decode_stages: int = 3
    # D=128 on H100: BLOCK_N 32 with 4 warps beat 64 with 8 (367 vs 358 TFLOP/s at 8k, 255 vs 219
    # at 8x1k) ...
    prefill: PrefillTiles = PrefillTiles()
    # ... but grids under 2 programs per SM (a short chunk over a long prefix) want 8 warps per
    # program (296 vs 183 TFLOP/s for 512 queries over an 8k prefix).
    prefill_small_grid: PrefillTiles = PrefillTiles(128, 64, 8, 2)
    # Split-KV aims for this many programs per SM: 8 reached 2.87 TB/s at 8 x 32k where 4 gave 2.59.
    waves: int = 8
    # Eager steps only: shorter splits cost more in merging than they win.
    min_split_tokens: int = 256

    @staticmethod
    def for_device(device: torch.device, head_dim: int, dtype: torch.dtype) -> KernelConfig:
        if device.type != "cuda":  # interpreter: small tiles keep CPU tests fast
            tiny = PrefillTiles(16, 16, 1, 1)
            return KernelConfig(
                decode_block_n=16,
                decode_warps=1,
                decode_stages=1,
                prefill=tiny,
                prefill_small_grid=tiny,
                waves=8,  # with 4 pretend SMs: several splits even on tiny batches
                min_split_tokens=16,
            )
        if dtype == torch.float32:  # no tensor-core path: small tiles avoid register spills
            small = PrefillTiles(32, 32, 4, 2)
            return KernelConfig(decode_block_n=32, prefill=small, prefill_small_grid=small)
        if head_dim <= 64:  # same bytes per K/V tile as D=128 with BLOCK_N 64
            return KernelConfig(
                decode_block_n=128,
                prefill=PrefillTiles(128, 64, 4, 3),
                prefill_small_grid=PrefillTiles(128, 64, 8, 3),
            )
        return KernelConfig()


@dataclass(frozen=True)
class TritonMetadata:
    batch: StagedBatch
    num_reqs: int
    num_tokens: int  # real tokens
    num_tokens_padded: int
    is_decode: bool
    num_splits: int
    scratch: torch.Tensor | None  # float32 split-KV partials
    locks: torch.Tensor | None  # split-KV: int32 per (request, KV head), zero between launches
    prefill_tiles: PrefillTiles


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    cudagraph_support = CudaGraphSupport.ALWAYS
    accepts_fused_rope_kv_write = True
    features = frozenset({"sliding_window", "logits_soft_cap"})

    def __init__(self, spec: AttentionSpec, config: KernelConfig | None = None) -> None:
        super().__init__(spec)
        if spec.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "the triton attention backend needs a CUDA device (or TRITON_INTERPRET=1, "
                "set before triton is imported, for CPU tests)"
            )
        self.config = config or KernelConfig.for_device(spec.device, spec.head_dim, spec.dtype)
        if spec.device.type == "cuda":
            props = torch.cuda.get_device_properties(spec.device)
            self._num_sms = props.multi_processor_count
        else:
            self._num_sms = 4
        self._buffers: StepBuffers | None = None
        self._scratch: torch.Tensor | None = None
        self._locks: torch.Tensor | None = None
        self._num_blocks: int | None = None  # pool size, bounds a request's pages

    def allocate_kv_caches(self, num_blocks: int, num_layers: int) -> list[torch.Tensor]:
        self._num_blocks = num_blocks
        return super().allocate_kv_caches(num_blocks, num_layers)

    # --- split-KV planning ----------------------------------------------------------------------
    def num_splits(self, num_req_slots: int, max_seq_len: int | None) -> int:
        """Splits per request so the decode grid fills the GPU; `max_seq_len` None means the
        launch may be replayed for any length (a captured graph), so it cannot be used.

        Splits are also added until the last round of programs over the multiprocessors is at
        least 90% full: with 8 requests x 8 KV heads, 9 splits leave 48 of 132 SMs one program
        longer than the rest (measured 81% of copy bandwidth at 32k), 10 splits do not."""
        programs = max(num_req_slots * self.spec.num_kv_heads, 1)
        cap = MAX_SPLITS
        if max_seq_len is not None:
            cap = min(cap, triton.cdiv(max_seq_len, self.config.min_split_tokens))
        splits = min(cap, triton.cdiv(self.config.waves * self._num_sms, programs))
        splits = max(splits, 1)
        while splits > 1 and splits < cap:
            rounds = programs * splits / self._num_sms
            if rounds / math.ceil(rounds) >= 0.9:
                break
            splits += 1
        return splits

    def _partials(self, num_req_slots: int, splits: int) -> int:
        return partial_numel(num_req_slots, self.spec.num_heads, self.spec.head_dim, splits)

    # --- per step, outside the graph ------------------------------------------------------------
    def prepare_for_capture(self, max_num_reqs: int, max_num_tokens: int) -> None:
        dev = self.spec.device
        self._buffers = StepBuffers(max_num_reqs, max_num_tokens, dev, self._num_blocks)
        need = max(self._partials(r, self.num_splits(r, None)) for r in range(1, max_num_reqs + 1))
        self._scratch = torch.empty(max(need, 1), dtype=torch.float32, device=dev)
        self._locks = self._zero_locks(max_num_reqs)

    def _zero_locks(self, num_req_slots: int) -> torch.Tensor:
        n = num_req_slots * self.spec.num_kv_heads
        return torch.zeros(max(n, 1), dtype=torch.int32, device=self.spec.device)

    def build_metadata(self, inputs: AttentionInputs) -> TritonMetadata:
        if self._buffers is not None and self._buffers.fits(inputs):
            batch = self._buffers.stage(inputs)
        else:
            batch = unstaged(inputs)
        is_decode = inputs.is_decode
        if is_decode and batch.persistent and batch.num_req_slots < inputs.slot_mapping.shape[0]:
            batch = unstaged(inputs)  # padded decode rows exceed the request slots
        splits, scratch, locks = 1, None, None
        if is_decode:
            max_seq = None if batch.persistent else inputs.max_seq_len
            splits = self.num_splits(batch.num_req_slots, max_seq)
            need = self._partials(batch.num_req_slots, splits)
            if need and self._scratch is not None and self._scratch.numel() >= need:
                scratch = self._scratch
            elif need:
                scratch = torch.empty(need, dtype=torch.float32, device=self.spec.device)
                if self._buffers is None:  # nothing captured can hold the old one: reuse it
                    self._scratch = scratch
            if need:
                slots = batch.num_req_slots
                if self._locks is None or self._locks.numel() < slots * self.spec.num_kv_heads:
                    # an eager batch past the captured sizes; the captured graphs keep theirs
                    locks = self._zero_locks(slots)
                    if self._buffers is None:
                        self._locks = locks
                else:
                    locks = self._locks
        tiles = self.config.prefill
        if not is_decode:
            tokens = inputs.slot_mapping.shape[0] if batch.persistent else inputs.num_tokens
            block_q = prefill_block_q(self.spec.num_heads // self.spec.num_kv_heads, tiles.block_m)
            programs = (triton.cdiv(tokens, block_q) + batch.num_req_slots) * self.spec.num_kv_heads
            if programs < 2 * self._num_sms:
                tiles = self.config.prefill_small_grid
        return TritonMetadata(
            batch=batch,
            num_reqs=inputs.num_reqs,
            num_tokens=inputs.num_tokens,
            num_tokens_padded=inputs.slot_mapping.shape[0],
            is_decode=is_decode,
            num_splits=splits,
            scratch=scratch,
            locks=locks,
            prefill_tiles=tiles,
        )

    # --- inside the graph -----------------------------------------------------------------------
    def write_kv(
        self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, metadata: TritonMetadata
    ) -> None:
        write_kv(k, v, kv_cache, metadata.batch.slot_mapping)

    def rope_write_kv(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: TritonMetadata,
    ) -> torch.Tensor:
        return rope_and_write_kv_per_token(q, k, v, cos, sin, kv_cache, metadata.batch.slot_mapping)

    def attend(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: TritonMetadata,
        out: torch.Tensor,
        layer: LayerAttention = FULL_ATTENTION,
    ) -> None:
        md, cfg, b = metadata, self.config, metadata.batch
        if md.is_decode:
            decode_attention(
                q,
                kv_cache,
                b.block_table,
                b.seq_lens,
                out,
                self.spec.scale,
                num_reqs=min(b.num_req_slots, q.shape[0]),  # rows past q's end: none
                num_splits=md.num_splits,
                scratch=md.scratch,
                locks=md.locks,
                block_n=cfg.decode_block_n,
                num_warps=cfg.decode_warps,
                num_stages=cfg.decode_stages,
                sliding_window=layer.sliding_window,
                logits_soft_cap=layer.logits_soft_cap,
            )
        else:
            prefill_attention(
                q,
                kv_cache,
                b.block_table,
                b.seq_lens,
                b.query_start_loc,
                out,
                self.spec.scale,
                num_reqs=b.num_req_slots,
                num_tokens=md.num_tokens_padded if b.persistent else md.num_tokens,
                block_m=md.prefill_tiles.block_m,
                block_n=md.prefill_tiles.block_n,
                num_warps=md.prefill_tiles.warps,
                num_stages=md.prefill_tiles.stages,
                sliding_window=layer.sliding_window,
                logits_soft_cap=layer.logits_soft_cap,
            )
