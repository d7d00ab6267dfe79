"""Drop FP8 quantizations that repeat one already in the graph: the same tensor quantized the
same way (dynamic per token or per group, or with the same static scale) gives the same E4M3
values and scales, so later copies are no-ops and their users read the first.

Where they come from: each FP8 linear quantizes its own input, so q/k/v (and gate/up) quantize
one tensor three (two) times whenever gemm_merge has not merged them (turned off, static scales
that differ, block scales that do not line up); Inductor does not merge calls of custom ops.
With one quantization left, fuse_norm_quant can fuse it into the norm that feeds it.

A quantize -> dequantize pair never appears in our graphs: FP8 linears hand E4M3 operands to
the GEMM and never dequantize activations in the graph, so there is no such pair to remove
(and removing one would not be a no-op: it would skip a rounding).
"""

from __future__ import annotations

import operator
from typing import Any, ClassVar

import torch
from torch import fx

import compiled_llm.kernels  # noqa: F401  (registers the ops)
from compiled_llm.passes.base import CompilerPass

ops = torch.ops.compiled_llm
_QUANT = (
    ops.quant_fp8_per_token.default,
    ops.quant_fp8_per_group.default,
    ops.quant_fp8_static.default,
)


class DedupQuantPass(CompilerPass):
    name = "dedup_quant"
    description = "drops repeated FP8 quantizations of one tensor (their users read the first)"
    enabled_by_default = False
    default_for_quantization: ClassVar[tuple[str, ...]] = ("fp8",)

    def apply(self, graph: fx.Graph) -> int:
        first: dict[tuple[Any, ...], fx.Node] = {}
        count = 0
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in _QUANT:
                continue
            key = (node.target, *node.args, *sorted(node.kwargs.items()))
            kept = first.setdefault(key, node)
            if kept is not node:
                node.replace_all_uses_with(kept)
                graph.erase_node(node)
                count += 1
        if count:
            order = {n: i for i, n in enumerate(graph.nodes)}
            for node in first.values():
                _merge_getitems(graph, node, order)
        return count


def _merge_getitems(graph: fx.Graph, node: fx.Node, order: dict[fx.Node, int]) -> None:
    """One `node[i]` per index, so the quantization's results have one reader each (what
    fusion patterns look for)."""
    by_index: dict[Any, fx.Node] = {}
    for user in sorted(node.users, key=order.__getitem__):
        if user.target is not operator.getitem:
            continue
        kept = by_index.setdefault(user.args[1], user)
        if kept is not user:
            user.replace_all_uses_with(kept)
            graph.erase_node(user)
