"""Pure-PyTorch paged attention: gather a request's pages, then scaled-dot-product attention.

The CPU default and the correctness oracle for the other backends. It computes in float32 whatever
the cache dtype, and loops over requests (it is opaque to the compiler, so the loop is fine).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from compiled_llm.attention_backends.base import AttentionBackend, AttentionInputs


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def build_metadata(self, inputs: AttentionInputs) -> AttentionInputs:
        return inputs

    def write_kv(
        self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionInputs
    ) -> None:
        n = metadata.num_tokens
        slots = metadata.slot_mapping[:n]
        keep = slots >= 0  # -1: a token that must not be written (padding, synthetic batches)
        slots, k, v = slots[keep], k[:n][keep], v[:n][keep]
        bs = self.spec.block_size
        blocks, offsets = slots // bs, slots % bs
        kv_cache[blocks, 0, offsets] = k.to(kv_cache.dtype)
        kv_cache[blocks, 1, offsets] = v.to(kv_cache.dtype)

    def attend(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionInputs,
        out: torch.Tensor,
    ) -> None:
        bs = self.spec.block_size
        starts = metadata.query_start_loc_cpu.tolist()
        seq_lens = metadata.seq_lens_cpu.tolist()
        for i, seq_len in enumerate(seq_lens):
            q_start, q_end = starts[i], starts[i + 1]
            q_len = q_end - q_start
            if q_len == 0:
                continue
            num_blocks = -(-seq_len // bs)
            pages = kv_cache[metadata.block_table[i, :num_blocks].long()]
            k = pages[:, 0].reshape(num_blocks * bs, *pages.shape[-2:])[:seq_len]
            v = pages[:, 1].reshape(num_blocks * bs, *pages.shape[-2:])[:seq_len]
            qi = q[q_start:q_end].float().transpose(0, 1)  # [Hq, q_len, D]
            key_pos = torch.arange(seq_len, device=q.device)
            query_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
            mask = key_pos[None, :] <= query_pos[:, None]
            o = F.scaled_dot_product_attention(
                qi,
                k.float().transpose(0, 1),
                v.float().transpose(0, 1),
                attn_mask=mask,
                scale=self.spec.scale,
                enable_gqa=True,
            )
            out[q_start:q_end] = o.transpose(0, 1).to(out.dtype)
