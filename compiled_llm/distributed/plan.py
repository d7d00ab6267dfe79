"""Which slice of each checkpoint tensor a rank holds, decided by the tensor's name alone.

Rules by module name (the last component before `.weight`/`.bias`), as in HF checkpoints:

- column-parallel (output rows split): q_proj, gate_proj, up_proj (Mixtral's experts: w1, w3);
- k_proj, v_proj: split by KV head when num_kv_heads >= world_size, else replicated so that each
  rank holds the one KV head its query heads attend with;
- row-parallel (input columns split, output all-reduced): o_proj, down_proj (Mixtral's w2);
  their bias is not split: it is added once, after the reduce;
- stacked MoE experts (`*.experts.gate_up_proj` [E, 2I, H], `*.experts.down_proj` [E, H, I]):
  each expert's intermediate dim split (the gate and the up half each), output all-reduced;
- everything else (embeddings, lm_head, norms, routers) replicated. A vocab-parallel embedding
  and lm_head are a later step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from compiled_llm.distributed.parallel import TensorParallel

COLUMN = frozenset({"q_proj", "gate_proj", "up_proj", "w1", "w3"})
KV = frozenset({"k_proj", "v_proj"})
ROW = frozenset({"o_proj", "down_proj", "w2"})
STACKED = {"gate_up_proj": (1, 2), "down_proj": (2, 1)}  # stacked expert parameter -> dim, blocks


@dataclass(frozen=True)
class ShardSpec:
    """Part `index` of `count` equal parts along `dim`. With `blocks` > 1 the dim is `blocks`
    equal blocks (a stacked gate/up weight) and the part is taken from each, concatenated."""

    dim: int
    index: int
    count: int
    blocks: int = 1

    def shape(self, full: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
        size = full[self.dim]
        if size % (self.count * self.blocks):
            raise ValueError(
                f"dim {self.dim} of size {size} does not split into {self.count} parts "
                f"of {self.blocks} block(s)"
            )
        out = list(full)
        out[self.dim] = size // self.count
        return tuple(out)

    def read(self, source: Any) -> torch.Tensor:
        """This part of `source`: a tensor, or a safetensors slice (`safe_open(...).get_slice`),
        of which only these rows or columns are read from the file."""
        full = tuple(source.get_shape()) if hasattr(source, "get_shape") else tuple(source.shape)
        self.shape(full)  # validates
        block = full[self.dim] // self.blocks
        part = block // self.count
        pieces = []
        for b in range(self.blocks):
            start = b * block + self.index * part
            index = [slice(None)] * self.dim + [slice(start, start + part)]
            pieces.append(source[tuple(index)])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, self.dim)


@dataclass(frozen=True)
class ShardPlan:
    """The shard of every parameter / checkpoint tensor for one rank. ValueError (before any
    weight is read) where the heads do not split over the ranks."""

    tp: TensorParallel
    num_heads: int
    num_kv_heads: int

    def __post_init__(self) -> None:
        world = self.tp.world_size
        if self.num_heads % world:
            raise ValueError(
                f"tensor_parallel_size={world} does not divide num_attention_heads={self.num_heads}"
            )
        kv = self.num_kv_heads
        if (kv >= world and kv % world) or (kv < world and world % kv):
            raise ValueError(
                f"tensor_parallel_size={world} and num_key_value_heads={kv}: one must divide "
                "the other (KV heads are split over the ranks, or replicated when fewer)"
            )

    @property
    def local_heads(self) -> tuple[int, int]:
        """(query heads, KV heads) on this rank: what its attention backend and KV cache hold."""
        world = self.tp.world_size
        return self.num_heads // world, max(self.num_kv_heads // world, 1)

    def spec(self, name: str) -> ShardSpec | None:
        """The shard of tensor `name` (HF / parameter name) on this rank; None: replicated."""
        rank, world = self.tp.rank, self.tp.world_size
        if world == 1:
            return None
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] == "experts" and parts[-1] in STACKED:
            dim, blocks = STACKED[parts[-1]]
            return ShardSpec(dim, rank, world, blocks)
        if len(parts) < 2 or parts[-1] not in ("weight", "bias"):
            return None
        module, kind = parts[-2], parts[-1]
        if module in COLUMN:
            return ShardSpec(0, rank, world)
        if module in KV:
            kv = self.num_kv_heads
            if kv >= world:
                return ShardSpec(0, rank, world)
            return ShardSpec(0, rank * kv // world, kv)  # the KV head of this rank's queries
        if module in ROW and kind == "weight":
            return ShardSpec(1, rank, world)
        return None

    def reduces_output(self, module_name: str) -> bool:
        """Whether the module's output is a partial sum to be all-reduced."""
        last = module_name.rsplit(".", 1)[-1]
        return last in ROW or last == "experts"
