"""Flatten a block table into a CSR page list (FlashInfer's `indices`) on the device.

Doing it in one launch from device-side `indptr` keeps the per-step plan free of host syncs and
of host loops over requests. Rows past `num_reqs` (padding of a captured batch) get page 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# Per-step ints unspecialized: one compile for all batches, no JIT stall mid-run.
@triton.jit(do_not_specialize=["stride_bt", "num_reqs"])
def _flatten_kernel(bt_ptr, indptr_ptr, out_ptr, stride_bt, num_reqs, BLOCK: tl.constexpr):
    req = tl.program_id(0)
    start = tl.load(indptr_ptr + req)
    count = tl.load(indptr_ptr + req + 1) - start
    row = bt_ptr + req.to(tl.int64) * stride_bt
    # Padding rows read nothing. A bound rather than `mask & (req < num_reqs)`: the interpreter
    # broadcasts a scalar comparison as an integer array, which Triton >= 3.9 refuses as a mask.
    readable = tl.where(req < num_reqs, count, 0)
    for i0 in range(0, count, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        pages = tl.load(row + i, mask=i < readable, other=0)
        tl.store(out_ptr + start + i, pages, mask=i < count)


def flatten_block_table(
    block_table: torch.Tensor, indptr: torch.Tensor, num_reqs: int, out: torch.Tensor
) -> torch.Tensor:
    """out[indptr[i]:indptr[i+1]] = block_table[i, :count_i] for i < len(indptr) - 1."""
    batch = indptr.shape[0] - 1
    if batch > 0:
        _flatten_kernel[(batch,)](
            block_table, indptr, out, block_table.stride(0), num_reqs, BLOCK=256, num_warps=4
        )
    return out
