"""Split the captured graph at the attention ops.

Runs of consecutive splitting ops (KV write + attention) form their own pieces, which run
eagerly; everything between them is a piece for Inductor. For a decoder, the pieces between
attention layers are structurally identical, which is what lets them compile once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx
from torch.fx.node import _get_qualified_name
from torch.fx.passes.split_module import split_module


def split_graph(
    gm: fx.GraphModule, is_splitting_op: Callable[[fx.Node], bool]
) -> tuple[fx.GraphModule, dict[str, bool]]:
    """Returns the split module and, for each submodule name, whether it is a splitting piece."""
    partition: dict[fx.Node, int] = {}
    current, previous_split = 0, None
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        split = is_splitting_op(node)
        if previous_split is not None and split != previous_split:
            current += 1
        previous_split = split
        partition[node] = current
    split_gm = split_module(gm, gm, lambda n: partition[n], keep_original_order=True)
    kinds = {}
    for name, sub in split_gm.named_children():
        assert isinstance(sub, fx.GraphModule)
        kinds[name] = any(is_splitting_op(n) for n in sub.graph.nodes)
    return split_gm, kinds


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"T({value.dtype},{tuple(value.shape)},{tuple(value.stride())},{value.device.type})"
    if isinstance(value, torch.SymInt):
        return f"S({value})"
    return repr(value)


def structural_key(piece: fx.GraphModule, example_args: Iterable[Any]) -> str:
    """Equal for pieces that compute the same function of their inputs (names aside)."""
    index: dict[fx.Node, int] = {}
    lines = []
    for i, node in enumerate(piece.graph.nodes):
        index[node] = i

        def ref(a: Any) -> Any:
            return f"%{index[a]}" if isinstance(a, fx.Node) else a

        args = fx.node.map_aggregate(node.args, ref)
        kwargs = fx.node.map_aggregate(node.kwargs, ref)
        if node.op == "placeholder":
            target = "input"
        elif callable(node.target):
            target = _get_qualified_name(node.target)  # stable across processes
        else:
            target = str(node.target)
        lines.append(f"{node.op}|{target}|{args}|{kwargs}")
    lines += [_describe(a) for a in example_args]
    return hashlib.sha256("\n".join(map(str, lines)).encode()).hexdigest()
