"""compiled-llm's own Triton kernels for paged attention (NHD cache, see base.py)."""

from compiled_llm.attention_backends.triton_kernels.decode import decode_attention, partial_numel
from compiled_llm.attention_backends.triton_kernels.kv_write import (
    rope_and_write_kv,
    rope_and_write_kv_per_token,
    write_kv,
)
from compiled_llm.attention_backends.triton_kernels.page_indices import flatten_block_table
from compiled_llm.attention_backends.triton_kernels.prefill import prefill_attention

__all__ = [
    "decode_attention",
    "flatten_block_table",
    "partial_numel",
    "prefill_attention",
    "rope_and_write_kv",
    "rope_and_write_kv_per_token",
    "write_kv",
]
