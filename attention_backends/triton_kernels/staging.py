"""Persistent copies of a step's batch tensors, so captured CUDA graphs read this step's values.

A captured graph replays the kernels with the tensor addresses seen at capture. Metadata built
each step therefore copies the batch description into these buffers (device-to-device, stream
ordered, no host sync) and pads the unused request slots so that kernels launched over
`num_req_slots` requests treat them as empty (query length 0, sequence length 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compiled_llm.attention_backends.base import AttentionInputs


@dataclass(frozen=True)
class StagedBatch:
    """Device views a kernel launch reads; `num_req_slots` >= the real request count."""

    query_start_loc: torch.Tensor  # [num_req_slots + 1] int32
    seq_lens: torch.Tensor  # [num_req_slots] int32
    block_table: torch.Tensor  # [>= num_req_slots, width] int32
    slot_mapping: torch.Tensor  # [num_tokens_padded] int64
    num_req_slots: int
    persistent: bool  # True when these are the capture-time buffers


class StepBuffers:
    """Buffers sized by `prepare_for_capture(max_num_reqs, max_num_tokens)`.

    The block table's width changes from step to step (the longest request's page count), so its
    buffer is as wide as a request can ever be: the number of pages in the pool, which backends
    learn from `allocate_kv_caches`. Without it the first batch's width is taken and a wider
    table later is an error rather than a graph silently reading stale pages.
    """

    def __init__(
        self,
        max_num_reqs: int,
        max_num_tokens: int,
        device: torch.device,
        max_blocks_per_req: int | None = None,
    ) -> None:
        self.max_num_reqs = max_num_reqs
        self.max_num_tokens = max_num_tokens
        self.device = device
        self.query_start_loc = torch.zeros(max_num_reqs + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(max_num_reqs, dtype=torch.int32, device=device)
        self.slot_mapping = torch.full((max_num_tokens,), -1, dtype=torch.int64, device=device)
        self.block_table: torch.Tensor | None = None
        if max_blocks_per_req is not None:
            self._allocate_table(max_blocks_per_req)

    def _allocate_table(self, width: int) -> torch.Tensor:
        shape = (self.max_num_reqs, width)
        self.block_table = torch.zeros(shape, dtype=torch.int32, device=self.device)
        return self.block_table

    @property
    def max_blocks_per_req(self) -> int | None:
        return None if self.block_table is None else self.block_table.shape[1]

    def fits(self, inputs: AttentionInputs) -> bool:
        return (
            inputs.num_reqs <= self.max_num_reqs
            and inputs.slot_mapping.shape[0] <= self.max_num_tokens
        )

    def stage(self, inputs: AttentionInputs) -> StagedBatch:
        r, n_pad = inputs.num_reqs, inputs.slot_mapping.shape[0]
        width = inputs.block_table.shape[1]
        table = self.block_table
        if table is None:
            table = self._allocate_table(width)
        if width > table.shape[1]:
            raise ValueError(
                f"block table of width {width} exceeds the {table.shape[1]} pages per request "
                "staged for CUDA graphs: allocate the KV cache through the backend "
                "(allocate_kv_caches) before prepare_for_capture"
            )
        slots = min(max(n_pad, r), self.max_num_reqs)
        self.query_start_loc[: r + 1].copy_(inputs.query_start_loc[: r + 1], non_blocking=True)
        if slots > r:
            self.query_start_loc[r + 1 : slots + 1].fill_(inputs.num_tokens)
            self.seq_lens[r:slots].zero_()
        self.seq_lens[:r].copy_(inputs.seq_lens[:r], non_blocking=True)
        table[:r, :width].copy_(inputs.block_table[:r], non_blocking=True)
        self.slot_mapping[:n_pad].copy_(inputs.slot_mapping, non_blocking=True)
        return StagedBatch(
            query_start_loc=self.query_start_loc[: slots + 1],
            seq_lens=self.seq_lens[:slots],
            block_table=table,
            slot_mapping=self.slot_mapping[:n_pad],
            num_req_slots=slots,
            persistent=True,
        )


def unstaged(inputs: AttentionInputs) -> StagedBatch:
    """The batch's own tensors, for eager steps that no captured graph will replay."""
    return StagedBatch(
        query_start_loc=inputs.query_start_loc,
        seq_lens=inputs.seq_lens,
        block_table=inputs.block_table,
        slot_mapping=inputs.slot_mapping,
        num_req_slots=inputs.num_reqs,
        persistent=False,
    )
