"""`AttentionInputs.from_batch`, the one factory of a step's attention inputs, against slots and
positions worked out by hand."""

from __future__ import annotations

import numpy as np
import torch

from compiled_llm.attention_backends.base import AttentionInputs


def test_from_batch_packs_requests_and_pads() -> None:
    # Request 0: 3 new tokens after 4 cached (positions 4..6); request 1: a fresh prefill of 2;
    # request 2: one decode token at position 17. Block size 4.
    table = np.array([[7, 2, 0, 0, 0], [5, 0, 0, 0, 0], [1, 3, 6, 9, 8]], dtype=np.int32)
    inputs, positions = AttentionInputs.from_batch(
        np.array([3, 2, 1]), np.array([7, 2, 18]), table, 4, torch.device("cpu"),
        num_padded_tokens=8,
    )  # fmt: skip
    assert positions.tolist() == [4, 5, 6, 0, 1, 17]
    # position p of a request is slot table[row, p // 4] * 4 + p % 4; padding is -1
    assert inputs.slot_mapping.tolist() == [8, 9, 10, 20, 21, 33, -1, -1]
    assert inputs.query_start_loc.tolist() == inputs.query_start_loc_cpu.tolist() == [0, 3, 5, 6]
    assert inputs.seq_lens.tolist() == [7, 2, 18]
    assert (inputs.num_reqs, inputs.num_tokens) == (3, 6)
    assert (inputs.max_query_len, inputs.max_seq_len) == (3, 18)
    assert inputs.block_table.dtype == torch.int32 and inputs.slot_mapping.dtype == torch.int64
    assert not inputs.is_decode


def test_from_batch_without_kv_writes() -> None:
    inputs, positions = AttentionInputs.from_batch(
        np.array([1, 1]), np.array([1, 1]), np.array([[0], [1]]), 16, torch.device("cpu"),
        write_kv=False,
    )  # fmt: skip
    assert positions.tolist() == [0, 0]
    assert inputs.slot_mapping.tolist() == [-1, -1]
    assert inputs.is_decode
