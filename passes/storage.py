"""Parameters that share one storage: how a graph pass lays weights out side by side (GEMM
merging), and how a warm start, which skips the graph passes, restores that layout
(compilation/graph_cache.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch._guards import detect_fake_mode


def adjacent(tensors: Sequence[torch.Tensor]) -> bool:
    """Contiguous, same storage, each starting where the previous one ends."""
    first = tensors[0]
    storage = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    for t in tensors:
        if not t.is_contiguous() or t.untyped_storage().data_ptr() != storage:
            return False
        if t.storage_offset() != offset:
            return False
        offset += t.numel()
    return True


def merge_storage(params: Sequence[torch.Tensor], keep: list[torch.Tensor] | None = None) -> bool:
    """Make `params` adjacent rows of one new tensor (unless they already are). Also how a warm
    start that skips the graph passes restores the layout the compiled graph relies on."""
    if adjacent(params):
        return True
    # The compiler converts its real inputs to fake tensors after the graph passes, under the
    # symbolic shapes Dynamo recorded for each input (storage offset included), which a
    # re-pointed parameter no longer matches. Converting them now memoizes fakes that do; the
    # memo holds them weakly, so `keep` holds them for the rest of the compilation.
    mode = detect_fake_mode()
    if mode is not None and keep is not None:
        keep.extend(mode.from_tensor(p) for p in params)
    first = params[0]
    total = sum(p.shape[0] for p in params)
    with torch.inference_mode(False), torch.no_grad():
        merged = torch.empty((total, *first.shape[1:]), dtype=first.dtype, device=first.device)
        row = 0
        for p in params:
            n = p.shape[0]
            merged[row : row + n].copy_(p.data)
            p.data = merged[row : row + n]
            row += n
    return adjacent(params)
