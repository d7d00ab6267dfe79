"""Pure-PyTorch paged attention: gather a request's keys and values, then scaled-dot-product
attention.

The CPU default and the correctness oracle for the other backends. It computes in float32 whatever
the cache dtype (an FP8 cache is read back exactly: its values are E4M3 numbers with a scale of
1). One-token queries (decode) are attended together as one padded batch; the other requests
one at a time (the op is opaque to the compiler, so the loop is fine). What every layer of a step
shares (which cache rows hold each request's keys, the decode batch and its mask) is worked out
once per step in `build_metadata`.
Sliding windows are a mask (a query at position p sees keys at positions p - window < j <= p);
a logits soft-cap computes the scores itself (cap * tanh(scores / cap), then mask and softmax),
in HF's order of operations.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from compiled_llm.attention_backends.base import (
    FP8_KV_DTYPE,
    FULL_ATTENTION,
    AttentionBackend,
    AttentionInputs,
    LayerAttention,
    to_cache_dtype,
)
from compiled_llm.layers.rotary import apply_rotary


def _storable(t: torch.Tensor) -> torch.Tensor:
    """FP8 tensors as their bytes: indexed writes and gathers of float8 are not implemented on
    every device, those of uint8 are."""
    return t.view(torch.uint8) if t.dtype == FP8_KV_DTYPE else t


@dataclass(frozen=True)
class DecodeBatch:
    """The requests whose query is one token, attended together as one padded batch."""

    tokens: torch.Tensor | slice  # their query tokens in the flat batch
    rows: torch.Tensor  # [B, 2, longest]: cache rows of their keys (0) and values (1)
    key_pos: torch.Tensor  # [longest]
    lens: torch.Tensor  # [B, 1] int64: their lengths (the query sits at position len - 1)
    valid: torch.Tensor  # [B, 1, 1, longest]: key position < length


@dataclass
class TorchAttentionMetadata(AttentionInputs):
    """A step's inputs and what every layer reuses, worked out once by `build_metadata`. Cache
    rows index the cache viewed as [num_blocks * 2 * block_size, num_kv_heads, head_dim] (per
    block, its keys, then its values)."""

    write_rows: torch.Tensor  # [2, W] int64: where the written tokens' keys (0) and values (1) go
    written: torch.Tensor | None  # which of the first num_tokens tokens have a slot (None: all)
    decode: DecodeBatch | None
    others: list[tuple[int, torch.Tensor]]  # (request, its rows [1, 2, len]): longer queries


class TorchAttentionBackend(AttentionBackend):
    name = "torch"
    accepts_fused_rope_kv_write = True  # as the oracle: the model's own RoPE, then write_kv
    features = frozenset({"sliding_window", "logits_soft_cap"})

    def build_metadata(self, inputs: AttentionInputs) -> TorchAttentionMetadata:
        """Also accepted by `write_kv` and `attend` in place of their metadata (then made there)."""
        if isinstance(inputs, TorchAttentionMetadata):
            return inputs
        bs = self.spec.block_size
        slots = inputs.slot_mapping[: inputs.num_tokens]
        written = None
        if bool((slots < 0).any()):  # -1: must not be written (padding, synthetic batches)
            written = torch.nonzero(slots >= 0).flatten()
            slots = slots[written]
        keys = slots // bs * (2 * bs) + slots % bs
        starts = inputs.query_start_loc_cpu.numpy()
        q_lens = np.diff(starts)
        lens = torch.from_numpy(inputs.seq_lens_cpu.numpy().astype(np.int64))
        lens = lens.to(inputs.block_table.device)
        decode = np.flatnonzero(q_lens == 1)
        others = [
            (i, self._key_rows(inputs.block_table[i : i + 1], lens[i : i + 1])[0])
            for i in np.flatnonzero(q_lens > 1).tolist()
        ]
        return TorchAttentionMetadata(
            **{f.name: getattr(inputs, f.name) for f in fields(AttentionInputs)},
            write_rows=torch.stack((keys, keys + bs)),
            written=written,
            decode=self._decode_batch(inputs, decode, lens) if len(decode) else None,
            others=others,
        )

    def _decode_batch(
        self, inputs: AttentionInputs, requests: np.ndarray, lens: torch.Tensor
    ) -> DecodeBatch:
        b = len(requests)
        tokens: torch.Tensor | slice
        if requests[-1] == b - 1:  # requests 0..b-1, whose tokens are then 0..b-1
            tokens, block_table, lens = slice(0, b), inputs.block_table[:b], lens[:b]
        else:
            device = inputs.block_table.device
            index = torch.from_numpy(requests).to(device)
            tokens = inputs.query_start_loc[index].long()
            block_table, lens = inputs.block_table[index], lens[index]
        rows, valid = self._key_rows(block_table, lens)
        key_pos = torch.arange(rows.shape[-1], device=lens.device)
        return DecodeBatch(tokens, rows, key_pos, lens[:, None], valid[:, None, None, :])

    def _key_rows(
        self, block_table: torch.Tensor, lens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache rows of each request's keys and values at positions 0..longest-1 ([B, 2,
        longest]), and which positions it has ([B, longest]). Positions past a request's length
        read its position 0 (a written row, masked out later): a gather then never reads memory
        that no step wrote (NaN, or pages the OS has not mapped yet)."""
        bs = self.spec.block_size
        pos = torch.arange(int(lens.max()), device=lens.device)
        valid = pos[None, :] < lens[:, None]
        pos = torch.where(valid, pos, 0)
        keys = block_table.long().gather(1, pos // bs) * (2 * bs) + pos % bs
        return torch.stack((keys, keys + bs), dim=1), valid

    def write_kv(
        self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionInputs
    ) -> None:
        md = self.build_metadata(metadata)
        k, v = k[: md.num_tokens], v[: md.num_tokens]
        if md.written is not None:
            k, v = k[md.written], v[md.written]
        rows = _storable(kv_cache).view(-1, *kv_cache.shape[-2:])
        rows.index_copy_(0, md.write_rows[0], _storable(to_cache_dtype(k, kv_cache.dtype)))
        rows.index_copy_(0, md.write_rows[1], _storable(to_cache_dtype(v, kv_cache.dtype)))

    def rope_write_kv(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionInputs,
    ) -> torch.Tensor:
        self.write_kv(apply_rotary(k, cos, sin), v, kv_cache, metadata)
        return apply_rotary(q, cos, sin).contiguous()

    def attend(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionInputs,
        out: torch.Tensor,
        layer: LayerAttention = FULL_ATTENTION,
    ) -> None:
        md = self.build_metadata(metadata)
        if md.decode is not None:
            self._attend_decode(q, kv_cache, md.decode, out, layer)
        starts = md.query_start_loc_cpu.tolist()
        seq_lens = md.seq_lens_cpu.tolist()
        for i, rows in md.others:
            q_start, q_end, seq_len = starts[i], starts[i + 1], seq_lens[i]
            k, v = self._gather(kv_cache, rows)
            qi = q[q_start:q_end].float().transpose(0, 1)[None]  # [1, Hq, q_len, D]
            q_len = q_end - q_start
            if q_len == seq_len and layer == FULL_ATTENTION:  # no cached prefix: plain causal
                o = self._sdpa(qi, k, v, None, causal=True)
            else:
                key_pos = torch.arange(seq_len, device=q.device)
                query_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
                mask = key_pos[None, :] <= query_pos[:, None]
                if layer.sliding_window is not None:
                    mask &= key_pos[None, :] > query_pos[:, None] - layer.sliding_window
                o = self._masked(qi, k, v, mask, layer)
            out[q_start:q_end] = o[0].transpose(0, 1).to(out.dtype)

    def _attend_decode(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        batch: DecodeBatch,
        out: torch.Tensor,
        layer: LayerAttention,
    ) -> None:
        """All one-token queries at once, keys past each request's length masked. The query heads
        sharing a KV head become that head's query rows (GQA without copying K/V)."""
        k, v = self._gather(kv_cache, batch.rows)
        valid = batch.valid
        if layer.sliding_window is not None:  # the query sits at position len - 1
            inside = batch.key_pos[None, :] > batch.lens - 1 - layer.sliding_window
            valid = valid & inside[:, None, None, :]
        b, hkv, (hq, d) = k.shape[0], k.shape[1], q.shape[1:]
        qi = q[batch.tokens].float().view(b, hkv, hq // hkv, d)  # [B, Hkv, group, D]
        o = self._masked(qi, k, v, valid, layer)
        out[batch.tokens] = o.reshape(b, hq, d).to(out.dtype)

    def _gather(
        self, kv_cache: torch.Tensor, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at `rows` ([B, 2, L], from `_key_rows`) in float32, [B, Hkv, L, D] each: one
        gather for both, straight into their final layout."""
        b, _, length = rows.shape
        heads = kv_cache.shape[-2:]
        flat = _storable(kv_cache).view(-1, *heads)
        kv = flat.index_select(0, rows.view(-1)).view(kv_cache.dtype)
        kv = kv.view(b, 2, length, *heads).float()
        return kv[:, 0].transpose(1, 2), kv[:, 1].transpose(1, 2)

    def _masked(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor,
        layer: LayerAttention,
    ) -> torch.Tensor:
        """Attention of q [B, Hq, Lq, D] over k, v [B, Hkv, Lk, D] where `mask` (broadcast to
        [B, Hq, Lq, Lk]) is True, the scores soft-capped where the layer says so."""
        cap = layer.logits_soft_cap
        if cap is None:
            return self._sdpa(q, k, v, mask, causal=False)
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.spec.scale
        scores = torch.tanh(scores / cap) * cap
        scores = scores.masked_fill(~mask, float("-inf"))
        return torch.matmul(torch.softmax(scores, dim=-1), v)

    def _sdpa(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        causal: bool,
    ) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=self.spec.scale, enable_gqa=True
        )
