"""TP-readiness: an FP8 linear's scales split with its weight. Column parallel (output rows):
the shards' outputs concatenate to the whole layer's exactly; row parallel (input columns):
they sum to it, each shard quantizing its own slice of the activations (so within the E4M3
error, not exactly). Block scales split at block boundaries only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compiled_llm.quantization.fp8 import Fp8Linear


@pytest.mark.parametrize("block", [None, (32, 32)], ids=["per-channel", "block"])
def test_column_and_row_parallel_shards(block: tuple[int, int] | None) -> None:
    torch.manual_seed(0)
    layer = Fp8Linear.from_linear(nn.Linear(128, 192), block)
    x = torch.randn(5, 128)
    full = layer(x)
    for world in (2, 3) if block is None else (2,):
        cols = [layer.shard(0, r, world) for r in range(world)]
        assert sum(s.weight_scale.shape[0] for s in cols) == layer.weight_scale.shape[0]
        torch.testing.assert_close(torch.cat([s(x) for s in cols], dim=-1), full, rtol=0, atol=0)
    rows = [layer.shard(1, r, 2) for r in range(2)]
    assert [s.bias is not None for s in rows] == [True, False]  # added once
    partial = sum(s(x[:, 64 * r : 64 * (r + 1)]) for r, s in enumerate(rows))
    reference = x @ (layer.weight.float() * _expand(layer)).t() + layer.bias
    assert float((partial - reference).abs().max()) < 0.1 * float(reference.abs().max())
    assert float((partial - full).abs().max()) < 0.05 * float(full.abs().max())


def _expand(layer: Fp8Linear) -> torch.Tensor:
    from compiled_llm.kernels.fp8 import expand_scale

    if not layer.block_size:
        return layer.weight_scale
    return expand_scale(layer.weight_scale, tuple(layer.weight.shape), tuple(layer.block_size))


def test_shards_must_fall_on_block_boundaries() -> None:
    layer = Fp8Linear.from_linear(nn.Linear(96, 96), (32, 32))
    with pytest.raises(ValueError, match="whole 32-wide blocks"):
        layer.shard(0, 0, 2)  # 48 rows: one block and a half
    with pytest.raises(ValueError, match="dim must be"):
        layer.shard(2, 0, 2)
