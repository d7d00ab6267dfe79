"""Horizontal GEMM merge: linear layers that read the same input (q/k/v projections, gate/up)
become one GEMM on a merged weight, followed by a split of its output.

No weight is concatenated per step. At compile time the weights (and biases) of a group are
copied once into one new tensor and the parameters re-pointed at their rows of it
(`param.data = merged[a:b]`): the model keeps its parameters, nothing is stored twice, and
eager code and weight loading (`param.copy_`) still work. In the graph the merged weight is
`torch.as_strided` over the first weight's placeholder, which now starts the merged storage, so
the parameters stay graph inputs and identical layers still compile to one piece.

FP8 linears (quantization/fp8.py) merge the same way: sites whose input is the same tensor
quantized the same way (one dynamic quantization op, or static scales of equal value) become
one `fp8_scaled_mm` on the merged E4M3 weight and merged scales. Per-channel scales ([N, 1])
stack like the weights' rows; block scales ([N / bn, K / bk]) too when each weight's N is a
multiple of bn, else the group is left alone. The other sites' quantization ops are then dead
and dropped: one activation quantization per group.

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
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx, nn
from torch._dispatch.python import enable_python_dispatcher
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils import _pytree as pytree

import compiled_llm.kernels  # noqa: F401  (registers the FP8 ops matched below)
from compiled_llm.passes.base import CompilerPass, Stage
from compiled_llm.passes.storage import merge_storage

_LINEAR = (torch._C._nn.linear, torch.nn.functional.linear)
_FP8_MM = torch.ops.compiled_llm.fp8_scaled_mm.default
_FP8_QUANT = (
    torch.ops.compiled_llm.quant_fp8_per_token.default,
    torch.ops.compiled_llm.quant_fp8_per_group.default,
)
_FP8_STATIC = torch.ops.compiled_llm.quant_fp8_static.default


def _linear_args(node: fx.Node) -> tuple[Any, Any, Any]:
    args = list(node.args) + [None] * (3 - len(node.args))
    x = args[0] if args[0] is not None else node.kwargs.get("input")
    w = args[1] if args[1] is not None else node.kwargs.get("weight")
    b = args[2] if args[2] is not None else node.kwargs.get("bias")
    return x, w, b


def _fake(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn on the example values of its node arguments, for the new node's meta (best effort).

    Under the Python dispatcher, as Dynamo and AOTAutograd run fake ops: without it an op's C++
    decomposition reads plain sizes, which turns a symbolic size into an int and guards it.
    On CUDA, `linear` of a 3-D bf16 input (the transformers fallback's [1, T, hidden]) did so and
    pinned the token count to the compiling call's 16, failing the compile."""
    values = fx.node.map_aggregate(
        args, lambda a: a.meta.get("example_value") if isinstance(a, fx.Node) else a
    )
    fakes = [v for v in pytree.tree_leaves(values) if isinstance(v, FakeTensor)]
    if not fakes:
        return None
    try:
        with fakes[0].fake_mode, enable_python_dispatcher():
            return fn(*values, **kwargs)
    except Exception:  # noqa: BLE001 - metadata only; the graph is right without it
        return None


@dataclass(frozen=True)
class _Site:
    """One GEMM on a parameter: `linear(x, weight, bias)` or an FP8 linear's
    `fp8_scaled_mm(q, q_scale, weight, weight_scale, block, bias, dtype)`. Sites with one key
    read the same input the same way and can share one GEMM."""

    node: fx.Node
    key: tuple[Any, ...]
    weight: fx.Node
    scale: fx.Node | None  # FP8: [rows, cols] with `rows_per_scale` weight rows per scale row
    bias: fx.Node | None
    rows_per_scale: int = 1


def _fp8_input(q: Any, q_scale: Any, values: dict[fx.Node, Any]) -> tuple[Any, ...] | None:
    """What an FP8 GEMM's quantized input is, as a key: the same tensor quantized the same
    way (dynamically, or with equal static scales) gives the same operands."""
    if not (isinstance(q, fx.Node) and isinstance(q_scale, fx.Node)):
        return None
    if q.target is operator.getitem and q_scale.target is operator.getitem:
        quant = q.args[0]
        if (
            isinstance(quant, fx.Node)
            and quant.target in _FP8_QUANT
            and q_scale.args[0] is quant
            and (q.args[1], q_scale.args[1]) == (0, 1)
        ):
            return (quant.target, *quant.args)
    if q.target is _FP8_STATIC:
        scale = values.get(q.args[1])  # type: ignore[arg-type]
        if isinstance(scale, torch.Tensor) and scale.numel() == 1 and scale.device.type != "meta":
            return (_FP8_STATIC, q.args[0], float(scale.detach().float().reshape(())))
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
        groups: dict[tuple[Any, ...], list[_Site]] = {}
        for node in graph.nodes:
            site = self._site(node, values)
            if site is not None:
                groups.setdefault(site.key, []).append(site)
        count = 0
        for members in groups.values():
            if len(members) > 1 and self._rewrite(graph, members, values):
                count += 1
        return count

    def _site(self, node: fx.Node, values: dict[fx.Node, Any]) -> _Site | None:
        if node.op != "call_function":
            return None
        if node.target in _LINEAR:
            x, w, b = _linear_args(node)
            if self._mergeable(w, values) and (b is None or self._mergeable(b, values)):
                return _Site(node, ("linear", x, b is None), w, None, b)
            return None
        if node.target is not _FP8_MM or node.kwargs:
            return None
        q, q_scale, w, w_scale, block, b, dtype = node.args
        source = _fp8_input(q, q_scale, values)
        if (
            source is None
            or not self._mergeable(w, values)
            or not self._mergeable(w_scale, values)
            or not (b is None or self._mergeable(b, values))
        ):
            return None
        block = list(block)  # type: ignore[arg-type]
        key = ("fp8", source, tuple(block), b is None, dtype)
        return _Site(node, key, w, w_scale, b, block[0] if block else 1)  # type: ignore[arg-type]

    @staticmethod
    def _mergeable(arg: Any, values: dict[fx.Node, Any]) -> bool:
        """A plain parameter placeholder used by one GEMM only."""
        if not (isinstance(arg, fx.Node) and arg.op == "placeholder" and len(arg.users) == 1):
            return False
        p = values.get(arg)
        return (
            isinstance(p, nn.Parameter)
            and type(p.data) is torch.Tensor
            and p.layout == torch.strided
            and p.device.type != "meta"
        )

    def _rewrite(self, graph: fx.Graph, members: list[_Site], values: dict[fx.Node, Any]) -> bool:
        weights = [values[m.weight] for m in members]
        scales = [values[m.scale] for m in members if m.scale is not None]
        biases = [values[m.bias] for m in members if m.bias is not None]
        w0 = weights[0]
        if any(
            w.dim() != 2
            or w.shape[1] != w0.shape[1]
            or w.dtype != w0.dtype
            or w.device != w0.device
            for w in weights
        ) or any(b.dim() != 1 or b.dtype != biases[0].dtype for b in biases):
            return False
        rows = members[0].rows_per_scale
        if scales and any(
            s.dim() != 2
            or s.shape[1] != scales[0].shape[1]
            or s.dtype != scales[0].dtype
            or w.shape[0] % rows  # a block scale row may not straddle two weights
            or s.shape[0] * rows != w.shape[0]
            for w, s in zip(weights, scales)
        ):
            return False
        for tensors in (weights, scales, biases):
            if tensors and not merge_storage(tensors, self._fakes):
                return False
        sizes = [int(w.shape[0]) for w in weights]
        total, k = sum(sizes), int(w0.shape[1])
        first = members[0]
        with graph.inserting_before(first.node):
            w_all = self._call(graph, torch.as_strided, first.weight, (total, k), (k, 1))
            b_all = None
            if first.bias is not None:
                b_all = self._call(graph, torch.as_strided, first.bias, (total,), (1,))
            if first.scale is None:
                x = _linear_args(first.node)[0]
                y = self._call(graph, torch._C._nn.linear, x, w_all, b_all)
            else:
                cols = int(scales[0].shape[1])
                s_all = self._call(
                    graph, torch.as_strided, first.scale, (total // rows, cols), (cols, 1)
                )
                q, q_scale, _, _, block, _, dtype = first.node.args
                y = self._call(graph, _FP8_MM, q, q_scale, w_all, s_all, block, b_all, dtype)
            parts = self._call(graph, torch.split, y, sizes, dim=-1)
            for i, member in enumerate(members):
                out = self._call(graph, operator.getitem, parts, i)
                member.node.replace_all_uses_with(out)
        for member in members:
            graph.erase_node(member.node)
        return True

    @staticmethod
    def _call(graph: fx.Graph, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> fx.Node:
        node = graph.call_function(fn, args, kwargs)
        value = _fake(fn, *args, **kwargs)
        if value is not None:
            node.meta["example_value"] = value
        return node
