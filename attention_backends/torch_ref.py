"""Pure-PyTorch paged attention: gather a request's pages, then scaled-dot-product attention.

The CPU default and the correctness oracle for the other backends. It computes in float32 whatever
the cache dtype (an FP8 cache is read back exactly: its values are E4M3 numbers with a scale of
1), and loops over requests (it is opaque to the compiler, so the loop is fine).
Sliding windows are a mask (a query at position p sees keys at positions p - window < j <= p);
a logits soft-cap computes the scores itself (cap * tanh(scores / cap), then mask and softmax),
in HF's order of operations.
"""

from __future__ import annotations

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


class TorchAttentionBackend(AttentionBackend):
    name = "torch"
    accepts_fused_rope_kv_write = True  # as the oracle: the model's own RoPE, then write_kv
    features = frozenset({"sliding_window", "logits_soft_cap"})

    def build_metadata(self, inputs: AttentionInputs) -> AttentionInputs:
        return inputs

    def write_kv(
        self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionInputs
    ) -> None:
        n = metadata.num_tokens
        slots = metadata.slot_mapping[:n]
        k, v = k[:n], v[:n]
        if bool((slots < 0).any()):  # -1: must not be written (padding, synthetic batches)
            keep = slots >= 0
            slots, k, v = slots[keep], k[keep], v[keep]
        bs = self.spec.block_size
        blocks, offsets = slots // bs, slots % bs
        cache = _storable(kv_cache)
        cache[blocks, 0, offsets] = _storable(to_cache_dtype(k, kv_cache.dtype))
        cache[blocks, 1, offsets] = _storable(to_cache_dtype(v, kv_cache.dtype))

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
        starts = metadata.query_start_loc_cpu.tolist()
        seq_lens = metadata.seq_lens_cpu.tolist()
        decode = [i for i in range(len(seq_lens)) if starts[i + 1] - starts[i] == 1]
        if len(decode) > 1:
            self._attend_decode(q, kv_cache, metadata, out, decode, starts, seq_lens, layer)
            decode_set = set(decode)
        else:
            decode_set = set()
        for i, seq_len in enumerate(seq_lens):
            if i in decode_set or starts[i + 1] == starts[i]:
                continue
            q_start, q_end = starts[i], starts[i + 1]
            k, v = self._gather(kv_cache, metadata.block_table[i : i + 1], seq_len)
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
        metadata: AttentionInputs,
        out: torch.Tensor,
        rows: list[int],
        starts: list[int],
        seq_lens: list[int],
        layer: LayerAttention,
    ) -> None:
        """All one-token queries at once: pages gathered into a padded batch, keys masked. The
        query heads sharing a KV head become that head's query rows (GQA without copying K/V)."""
        longest = max(seq_lens[i] for i in rows)
        index = torch.tensor(rows, device=q.device)
        k, v = self._gather(kv_cache, metadata.block_table[index], longest)
        lens = torch.tensor([seq_lens[i] for i in rows], device=q.device)
        key_pos = torch.arange(longest, device=q.device)[None, :]
        valid = key_pos < lens[:, None]  # [B, longest]
        if layer.sliding_window is not None:  # the query sits at position len - 1
            valid &= key_pos > lens[:, None] - 1 - layer.sliding_window
        # Pages past a row's length hold whatever was there (NaN included): zero them, since a
        # masked-out NaN still poisons the weighted sum. k and v are our own gathered copies.
        invalid = ~valid[:, None, :, None]
        k.masked_fill_(invalid, 0.0)
        v.masked_fill_(invalid, 0.0)
        tokens = torch.tensor([starts[i] for i in rows], device=q.device)
        b, hkv, (hq, d) = len(rows), k.shape[1], q.shape[1:]
        qi = q[tokens].float().view(b, hkv, hq // hkv, d)  # [B, Hkv, group, D]
        o = self._masked(qi, k, v, valid[:, None, None, :], layer)
        out[tokens] = o.reshape(b, hq, d).to(out.dtype)

    def _gather(
        self, kv_cache: torch.Tensor, block_table: torch.Tensor, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the first `length` positions of each row's pages: [B, Hkv, length, D].
        One gather per tensor straight into its final layout (no copy after it)."""
        bs = self.spec.block_size
        num_blocks = -(-length // bs)
        index = block_table[:, :num_blocks].reshape(-1).long()
        b = block_table.shape[0]
        out = []
        for which in (0, 1):
            pages = _storable(kv_cache[:, which]).index_select(0, index)  # [B * n, bs, Hkv, D]
            pages = pages.view(kv_cache.dtype)
            t = pages.view(b, num_blocks * bs, *pages.shape[-2:])[:, :length]
            out.append(t.float().transpose(1, 2))
        return out[0], out[1]

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
