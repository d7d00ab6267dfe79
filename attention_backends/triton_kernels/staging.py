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
    """Buffers sized by `prepare_for_capture(max_num_reqs, max_num_tokens)`; the block-table
    width is taken from the first batch staged and may not grow afterwards."""

    def __init__(self, max_num_reqs: int, max_num_tokens: int, device: torch.device) -> None:
        self.max_num_reqs = max_num_reqs
        self.max_num_tokens = max_num_tokens
        self.query_start_loc = torch.zeros(max_num_reqs + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(max_num_reqs, dtype=torch.int32, device=device)
        self.slot_mapping = torch.full((max_num_tokens,), -1, dtype=torch.int64, device=device)
        self.block_table: torch.Tensor | None = None

    def fits(self, inputs: AttentionInputs) -> bool:
        width = inputs.block_table.shape[1]
        return (
            inputs.num_reqs <= self.max_num_reqs
            and inputs.slot_mapping.shape[0] <= self.max_num_tokens
            and (self.block_table is None or width <= self.block_table.shape[1])
        )

    def stage(self, inputs: AttentionInputs) -> StagedBatch:
        r, n_pad = inputs.num_reqs, inputs.slot_mapping.shape[0]
        slots = min(max(n_pad, r), self.max_num_reqs)
        if self.block_table is None:
            width = inputs.block_table.shape[1]
            self.block_table = torch.zeros(
                (self.max_num_reqs, width), dtype=torch.int32, device=self.seq_lens.device
            )
        self.query_start_loc[: r + 1].copy_(inputs.query_start_loc[: r + 1], non_blocking=True)
        if slots > r:
            self.query_start_loc[r + 1 : slots + 1].fill_(inputs.num_tokens)
            self.seq_lens[r:slots].zero_()
        self.seq_lens[:r].copy_(inputs.seq_lens[:r], non_blocking=True)
        width = inputs.block_table.shape[1]
        self.block_table[:r, :width].copy_(inputs.block_table[:r], non_blocking=True)
        self.slot_mapping[:n_pad].copy_(inputs.slot_mapping, non_blocking=True)
        return StagedBatch(
            query_start_loc=self.query_start_loc[: slots + 1],
            seq_lens=self.seq_lens[:slots],
            block_table=self.block_table,
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
