"""Horizontal GEMM merge: linear layers that read the same input (q/k/v projections, gate/up)
become one GEMM on a merged weight, followed by a split of its output.

No weight is concatenated per step. At compile time the weights (and biases) of a group are
copied once into one new tensor and the parameters re-pointed at their rows of it
(`param.data = merged[a:b]`): the model keeps its parameters, nothing is stored twice, and
eager code and weight loading (`param.copy_`) still work. In the graph the merged weight is
`torch.as_strided` over the first weight's placeholder, which now starts the merged storage, so
the parameters stay graph inputs and identical layers still compile to one piece.

Every site is checked (same input, dtype, device, in_features; plain nn.Parameters used only by
this linear; adjacent and contiguous after merging) and skipped otherwise. The pass is
idempotent: parameters already merged are found adjacent and only the graph is rewritten. Warm
starts skip graph-stage passes; the saved graph records which inputs share a storage and
restores that layout with `passes/storage.py::merge_storage` (compilation/graph_cache.py).

Dynamo guards the parameters (graph inputs) on shape, stride, dtype and device, all kept by
re-pointing; it does not guard data pointers, and skips its no-aliasing guards on parameters
(`torch._dynamo.config.skip_no_tensor_aliasing_guards_on_parameters`, on by default; with it off
the merged parameters would alias each other and fail the guard, so the pass then does nothing).
Weights replaced later by new tensors (`load_state_dict(assign=True)`) would break adjacency:
update weights of a compiled model in place.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils import _pytree as pytree

from compiled_llm.passes.base import CompilerPass, Stage
from compiled_llm.passes.storage import merge_storage

_LINEAR = (torch._C._nn.linear, torch.nn.functional.linear)


def _linear_args(node: fx.Node) -> tuple[Any, Any, Any]:
    args = list(node.args) + [None] * (3 - len(node.args))
    x = args[0] if args[0] is not None else node.kwargs.get("input")
    w = args[1] if args[1] is not None else node.kwargs.get("weight")
    b = args[2] if args[2] is not None else node.kwargs.get("bias")
    return x, w, b


def _fake(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn on the example values of its node arguments, for the new node's meta (best effort)."""
    values = fx.node.map_aggregate(
        args, lambda a: a.meta.get("example_value") if isinstance(a, fx.Node) else a
    )
    fakes = [v for v in pytree.tree_leaves(values) if isinstance(v, FakeTensor)]
    if not fakes:
        return None
    try:
        with fakes[0].fake_mode:
            return fn(*values, **kwargs)
    except Exception:  # noqa: BLE001 - metadata only; the graph is right without it
        return None


class GemmMergePass(CompilerPass):
    name = "gemm_merge"
    description = "linears sharing an input (q/k/v, gate/up) -> one GEMM on merged weights + split"
    stage: ClassVar[Stage] = "graph"
    enabled_by_default = True

    def apply(self, graph: fx.Graph) -> int:
        self._fakes: list[torch.Tensor] = []
        if not torch._dynamo.config.skip_no_tensor_aliasing_guards_on_parameters:
            return 0
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        values = dict(zip(placeholders, self.example_inputs))
        groups: dict[tuple[fx.Node, bool], list[fx.Node]] = {}
        for node in graph.nodes:
            if node.op == "call_function" and node.target in _LINEAR:
                x, w, b = _linear_args(node)
                if self._mergeable(node, w, values) and (
                    b is None or self._mergeable(node, b, values)
                ):
                    groups.setdefault((x, b is None), []).append(node)
        count = 0
        for members in groups.values():
            if len(members) > 1 and self._rewrite(graph, members, values):
                count += 1
        return count

    @staticmethod
    def _mergeable(node: fx.Node, arg: Any, values: dict[fx.Node, Any]) -> bool:
        """A plain parameter placeholder used by this linear only."""
        if not (isinstance(arg, fx.Node) and arg.op == "placeholder" and len(arg.users) == 1):
            return False
        p = values.get(arg)
        return (
            isinstance(p, nn.Parameter)
            and type(p.data) is torch.Tensor
            and p.layout == torch.strided
            and p.device.type != "meta"
        )

    def _rewrite(self, graph: fx.Graph, members: list[fx.Node], values: dict[fx.Node, Any]) -> bool:
        weights = [values[_linear_args(m)[1]] for m in members]
        biases = [values[_linear_args(m)[2]] for m in members if _linear_args(m)[2] is not None]
        w0 = weights[0]
        if any(
            w.dim() != 2
            or w.shape[1] != w0.shape[1]
            or w.dtype != w0.dtype
            or w.device != w0.device
            for w in weights
        ) or any(b.dim() != 1 or b.dtype != biases[0].dtype for b in biases):
            return False
        if not merge_storage(weights, self._fakes) or (
            biases and not merge_storage(biases, self._fakes)
        ):
            return False
        sizes = [int(w.shape[0]) for w in weights]
        total, k = sum(sizes), int(w0.shape[1])
        first = members[0]
        x, w_node, b_node = _linear_args(first)
        with graph.inserting_before(first):
            w_all = self._call(graph, torch.as_strided, w_node, (total, k), (k, 1))
            b_all = None
            if b_node is not None:
                b_all = self._call(graph, torch.as_strided, b_node, (total,), (1,))
            y = self._call(graph, torch._C._nn.linear, x, w_all, b_all)
            parts = self._call(graph, torch.split, y, sizes, dim=-1)
            for i, member in enumerate(members):
                out = self._call(graph, operator.getitem, parts, i)
                member.replace_all_uses_with(out)
        for member in members:
            graph.erase_node(member)
        return True

    @staticmethod
    def _call(graph: fx.Graph, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> fx.Node:
        node = graph.call_function(fn, args, kwargs)
        value = _fake(fn, *args, **kwargs)
        if value is not None:
            node.meta["example_value"] = value
        return node
