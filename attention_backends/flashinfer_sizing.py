"""How much float workspace FlashInfer's plans take: pure arithmetic over the attention shape,
without importing flashinfer (so CPU tests check it). The formulas follow FlashInfer's planner
(include/flashinfer/attention/scheduler.cuh of flashinfer-python 0.6.18.post1)."""

from __future__ import annotations

WORKSPACE_BYTES = 128 * 1024 * 1024  # the floor; workspace_bytes() grows it per shape


def workspace_bytes(num_heads: int, num_kv_heads: int, head_dim: int, num_sms: int) -> int:
    """FlashInfer's float workspace for this attention shape: at least WORKSPACE_BYTES, and
    enough for the largest split-KV prefill partials its planner can ask for.

    FlashInfer's prefill plan (include/flashinfer/attention/scheduler.cuh, `PrefillPlan`) splits
    the KV of a batch into up to `2 * num_sms // num_kv_heads` work items when that fills the
    GPU better, and keeps float32 partial outputs for each: `num_heads * items * 128 (query tile)
    * head_dim` values plus one log-sum-exp per row. Fewer KV heads mean more items: the
    Qwen3-30B-A3B shape (32 heads over 4 KV heads, head_dim 128) may need 133 MiB on 132 SMs, more
    than the fixed 128 MiB this backend used to allocate, and its first plan failed. The decode
    plan's partials (one row per item) are far smaller; the two plans run one after the other
    on one stream, so they share the buffer.
    """
    items = 2 * num_sms // num_kv_heads
    partials = num_heads * items * 128 * (head_dim + 1) * 4
    return max(WORKSPACE_BYTES, partials + 16 * 1024 * 1024)  # + headroom for alignment


def cta_tile_q(packed_qo_len: int, head_dim: int) -> int:
    """Query rows per work item of FlashInfer's prefill kernel for requests of up to
    `packed_qo_len` rows (query tokens x query heads per KV head): `FA2DetermineCtaTileQ`
    (include/flashinfer/utils.cuh) on sm80 and later; an upper bound for head_dim >= 512."""
    if packed_qo_len > 64 and head_dim < 256:
        return 128
    return 64 if packed_qo_len > 16 else 16


def graph_workspace_bytes(
    num_heads: int, num_kv_heads: int, head_dim: int, num_sms: int, batch: int, rows: int
) -> int:
    """The float workspace a CUDA-graph plan of FlashInfer's prefill kernel (tensor-core decode,
    verification batches) may need for `batch` requests of `rows` query tokens in all.

    A graph's plan must hold any batch it will replay, so `PrefillSplitQOKVIndptr`
    (include/flashinfer/attention/scheduler.cuh) pads its work items to one per query tile that
    requests of those sizes could have, `ceil(rows * group / cta_tile_q) + batch - 1`, with the
    tile sized for the longest request possible (`rows - batch + 1` tokens), and at least the
    eager plan's `2 * num_sms // num_kv_heads`; each item keeps float32 partials of
    `cta_tile_q * head_dim` values and `cta_tile_q` log-sum-exps per query head. A 512-request
    decode graph of the Llama-3.1-8B shape needs 161 MiB, more than the 128 MiB floor: it failed
    at plan (`batch_prefill_tmp_v`) with max_num_seqs=512.
    """
    group = num_heads // num_kv_heads
    tile = cta_tile_q((rows - batch + 1) * group, head_dim)
    items = max(2 * num_sms // num_kv_heads, -(-rows * group // tile) + batch - 1)
    return items * num_heads * tile * (head_dim + 1) * 4 + 16 * 1024 * 1024


def decode_graph_workspace_bytes(num_heads: int, head_dim: int, num_sms: int, batch: int) -> int:
    """The same for a CUDA-graph plan of FlashInfer's CUDA-core decode kernel: its partials are
    one row per query head per work item, and a graph pads the items to the batch or to its
    grid (at most 32 blocks an SM)."""
    items = max(batch, 32 * num_sms)
    return items * num_heads * (head_dim + 1) * 4 + 16 * 1024 * 1024
