"""A rank's place in its tensor-parallel group, passed explicitly to what needs it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol


@dataclass(frozen=True)
class TensorParallel:
    """Rank `rank` of `world_size` in `group` (None: the default process group). A world of one
    is allowed and makes every collective a no-op, so callers need no special case."""

    rank: int
    world_size: int
    group: dist.ProcessGroup | None = None

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"tensor_parallel_size={self.world_size} must be at least 1")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank} must be in 0..{self.world_size - 1}")

    @classmethod
    def from_group(cls, group: dist.ProcessGroup | None = None) -> TensorParallel:
        """The calling process's place in an initialized group (the default one if None)."""
        return cls(dist.get_rank(group), dist.get_world_size(group), group)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over the group, as a functional collective: Dynamo traces it into
        `_c10d_functional.all_reduce` + `wait_tensor` in the captured graph, where passes see
        it (and Inductor lowers it), instead of a graph break at an in-place c10d call."""
        if self.world_size == 1:
            return x
        group = self.group if self.group is not None else dist.group.WORLD
        assert group is not None, "torch.distributed is not initialized"
        return funcol.all_reduce(x, "sum", group)

    def max_over_ranks(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise maximum of `x` over the group, in place, eagerly (a c10d call, not for
        traced code): for values the ranks must agree on at load, such as the FP8 weight scales
        of a row-parallel layer, whose rows each rank holds only a part of."""
        if self.world_size > 1:
            dist.all_reduce(x, dist.ReduceOp.MAX, group=self.group)
        return x
