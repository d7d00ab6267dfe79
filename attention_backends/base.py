"""The interface every paged-attention backend implements.

A backend owns: the KV-cache layout and its allocation, the per-step metadata it builds outside the
graph from the scheduler's batch (`AttentionInputs`), the two ops used inside the graph (KV-cache
write and attention), and what it allows under CUDA graphs.

All backends share one KV layout per layer, `[num_blocks, 2, block_size, num_kv_heads, head_dim]`
(FlashInfer's NHD layout), so the scheduler's block tables mean the same thing to each of them.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np
import torch


class CudaGraphSupport(enum.Enum):
    """How much of a forward a backend's ops can have captured in a CUDA graph."""

    NEVER = "never"  # attention must run eagerly between graph pieces
    DECODE = "decode"  # full graphs for decode batches (1 query token per request) only
    # full graphs for any batch: the runner uses them for decode and for speculative
    # verification batches (at most 1 + k query tokens per request; `num_padded_reqs`)
    ALWAYS = "always"


@dataclass(frozen=True)
class LayerAttention:
    """One layer's static attention attributes, beyond plain causal attention: the model gives
    them to the generic op (`models/attention.Attention`), the lowering pass carries them to the
    backend's op, and the backend's `attend` receives them. A field left None is a feature the
    layer does not use; every field set must be in the backend's `features`."""

    # A query at position p sees keys at positions > p - sliding_window (HF's convention).
    sliding_window: int | None = None
    # Scores become cap * tanh(scores / cap) before the softmax (Gemma 2).
    logits_soft_cap: float | None = None

    def __post_init__(self) -> None:
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {self.sliding_window}")
        if self.logits_soft_cap is not None and not self.logits_soft_cap > 0:
            raise ValueError(f"logits_soft_cap must be > 0, got {self.logits_soft_cap}")

    def features(self) -> set[str]:
        """Names of the fields this layer sets."""
        return {f.name for f in fields(self) if getattr(self, f.name) is not None}


FULL_ATTENTION = LayerAttention()


FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_KV_MAX = 448.0  # keys and values beyond +-448 are stored as +-448


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as the cache stores it: rounded to `dtype`, saturated first where that is FP8 (a plain
    cast would make NaN of anything past E4M3's largest value)."""
    if dtype == FP8_KV_DTYPE:
        return x.float().clamp(-FP8_KV_MAX, FP8_KV_MAX).to(dtype)
    return x.to(dtype)


@dataclass(frozen=True)
class AttentionSpec:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    device: torch.device
    scale: float
    # Each layer's attributes, by layer index (the model's `Attention` modules); empty: all
    # layers plain causal.
    layers: tuple[LayerAttention, ...] = ()
    # What the KV cache stores (None: `dtype`). FP8 (E4M3) keys and values are stored with a
    # per-tensor scale of 1: written saturated to +-448, read back exactly (CACHE_DTYPES).
    kv_cache_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.kv_cache_dtype not in (None, self.dtype, FP8_KV_DTYPE):
            raise ValueError(
                f"kv_cache_dtype must be the model's dtype or {FP8_KV_DTYPE}, "
                f"got {self.kv_cache_dtype}"
            )

    @property
    def cache_dtype(self) -> torch.dtype:
        return self.kv_cache_dtype or self.dtype

    @property
    def fp8_kv(self) -> bool:
        return self.cache_dtype == FP8_KV_DTYPE


@dataclass
class AttentionInputs:
    """One step's batch as attention sees it, common to all backends.

    Requests are packed: request i owns query tokens [query_start_loc[i], query_start_loc[i+1])
    of the flat batch, which are the last `query_len` of its `seq_lens[i]` tokens (the earlier ones
    are already in the KV cache). Device tensors are int32 except `slot_mapping` (int64, -1 for
    padding tokens that must not be written). Host copies let backends plan without syncing.
    """

    num_reqs: int
    num_tokens: int  # real tokens; tensors fed to the ops may be padded beyond this
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32, device
    seq_lens: torch.Tensor  # [num_reqs] int32, device
    block_table: torch.Tensor  # [num_reqs, max_blocks_per_req] int32, device
    slot_mapping: torch.Tensor  # [num_tokens_padded] int64, device
    query_start_loc_cpu: torch.Tensor  # [num_reqs + 1] int32, host
    seq_lens_cpu: torch.Tensor  # [num_reqs] int32, host
    max_query_len: int
    max_seq_len: int
    # The request count of the full CUDA graph the step replays (requests past num_reqs are
    # padding: no query tokens), or None when it replays none.
    num_padded_reqs: int | None

    @property
    def is_decode(self) -> bool:
        """Every request has exactly one query token."""
        return self.max_query_len == 1 and self.num_tokens == self.num_reqs

    @classmethod
    def from_batch(
        cls,
        query_lens: np.ndarray,
        seq_lens: np.ndarray,
        block_table: np.ndarray,
        block_size: int,
        device: torch.device,
        *,
        num_padded_tokens: int | None = None,
        num_padded_reqs: int | None = None,
        write_kv: bool = True,
    ) -> tuple[AttentionInputs, np.ndarray]:
        """The one way a step's inputs are made (engine, pass report, benchmarks, tests), with
        each query token's position (int64, host). Request i's `query_lens[i]` tokens are the
        last of its `seq_lens[i]`; they are written to the slots its `block_table` row names, or
        nowhere with `write_kv=False` (profiling and capture batches). Tokens past the real
        ones, up to `num_padded_tokens`, get slot -1; `num_padded_reqs` is passed on."""
        q_lens = np.asarray(query_lens, dtype=np.int64)
        lens = np.asarray(seq_lens, dtype=np.int64)
        num_reqs, num_tokens = len(q_lens), int(q_lens.sum())
        query_start_loc = np.zeros(num_reqs + 1, dtype=np.int32)
        np.cumsum(q_lens, out=query_start_loc[1:])
        starts = lens - q_lens
        positions = np.arange(num_tokens, dtype=np.int64) - np.repeat(
            query_start_loc[:-1] - starts, q_lens
        )
        slots = np.full(max(num_padded_tokens or 0, num_tokens), -1, dtype=np.int64)
        if write_kv:
            rows = np.repeat(np.arange(num_reqs), q_lens)
            blocks = block_table[rows, positions // block_size].astype(np.int64)
            slots[:num_tokens] = blocks * block_size + positions % block_size
        seq_lens_i32 = lens.astype(np.int32)

        def dev(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(device, non_blocking=True)

        inputs = cls(
            num_reqs=num_reqs,
            num_tokens=num_tokens,
            query_start_loc=dev(query_start_loc),
            seq_lens=dev(seq_lens_i32),
            block_table=dev(np.ascontiguousarray(block_table, dtype=np.int32)),
            slot_mapping=dev(slots),
            query_start_loc_cpu=torch.from_numpy(query_start_loc),
            seq_lens_cpu=torch.from_numpy(seq_lens_i32),
            max_query_len=int(q_lens.max()),
            max_seq_len=int(lens.max()),
            num_padded_reqs=num_padded_reqs,
        )
        return inputs, positions


class AttentionBackend(ABC):
    """A paged-attention implementation, chosen by name from the registry."""

    name: ClassVar[str]
    cudagraph_support: ClassVar[CudaGraphSupport] = CudaGraphSupport.NEVER
    # True where `rope_write_kv` is implemented: the compiler's `rope_kv_write` pass then hands
    # RoPE of q and k to the backend together with the KV write.
    accepts_fused_rope_kv_write: ClassVar[bool] = False
    # The `LayerAttention` fields `attend` implements; a model whose layers set another one is
    # refused when the backend is built, never answered wrongly.
    features: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, spec: AttentionSpec) -> None:
        self.spec = spec
        reason = self.refusal(spec)
        if reason is not None:
            raise ValueError(
                f"the {self.name} attention backend {reason}; choose another attention_backend"
            )

    @classmethod
    def refusal(cls, spec: AttentionSpec) -> str | None:
        """Why this backend cannot serve `spec`'s layers (None: it can); checked when built and
        by `auto`'s choice."""
        wanted = set().union(*(layer.features() for layer in spec.layers))
        missing = sorted(wanted - cls.features)
        if missing:
            return (
                f"does not implement {', '.join(missing)}, which this model's attention layers use"
            )
        return None

    # --- KV cache -------------------------------------------------------------------------------
    def kv_cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        s = self.spec
        return (num_blocks, 2, s.block_size, s.num_kv_heads, s.head_dim)

    def kv_cache_bytes_per_block(self, num_layers: int) -> int:
        s = self.spec
        per_block = 2 * s.block_size * s.num_kv_heads * s.head_dim
        return per_block * num_layers * torch.empty((), dtype=s.cache_dtype).element_size()

    def allocate_kv_caches(self, num_blocks: int, num_layers: int) -> list[torch.Tensor]:
        shape = self.kv_cache_shape(num_blocks)
        return [
            torch.empty(shape, dtype=self.spec.cache_dtype, device=self.spec.device)
            for _ in range(num_layers)
        ]

    # --- per step, outside the graph ------------------------------------------------------------
    @abstractmethod
    def build_metadata(self, inputs: AttentionInputs) -> Any:
        """Turn the common batch description into this backend's metadata (may plan kernels)."""

    # --- inside the graph -----------------------------------------------------------------------
    @abstractmethod
    def write_kv(
        self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, metadata: Any
    ) -> None:
        """Store k, v ([T, num_kv_heads, head_dim]) at their slots in `kv_cache`."""

    def rope_write_kv(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: Any,
    ) -> torch.Tensor:
        """RoPE of q and k (NeoX half split, `layers/rotary.apply_rotary` with per-token cos/sin
        [T, head_dim/2]) fused with `write_kv` of the rotated k and v. Returns the rotated q as a
        new contiguous tensor; q and k are not modified. Only where `accepts_fused_rope_kv_write`.
        """
        raise NotImplementedError(f"{type(self).__name__} has no fused RoPE + KV write")

    @abstractmethod
    def attend(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: Any,
        out: torch.Tensor,
        layer: LayerAttention = FULL_ATTENTION,
    ) -> None:
        """Causal attention of q ([T, num_heads, head_dim]) over the paged KV, into `out`, with
        the layer's attributes (only those in `features` are ever set)."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: Any,
        layer: LayerAttention = FULL_ATTENTION,
    ) -> torch.Tensor:
        self.write_kv(k, v, kv_cache, metadata)
        out = torch.empty_like(q)
        self.attend(q, kv_cache, metadata, out, layer)
        return out

    # --- CUDA graphs ----------------------------------------------------------------------------
    def prepare_for_capture(self, max_num_reqs: int, max_num_tokens: int) -> None:  # noqa: B027
        """Allocate the persistent buffers that captured graphs will read; optional."""
