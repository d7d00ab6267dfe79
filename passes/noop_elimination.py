"""Remove reshapes, views, slices and copies that do nothing, so fusion patterns see the ops
they expect next to each other.

Inductor's own no-op removal (before our passes) covers `view` to the same shape, full slices it
can prove full, and clones with identical metadata. This pass adds what it leaves behind or
what our passes create: `reshape`/`_unsafe_view` to the same shape, chains of views/reshapes
(collapsed onto their source), full slices, identity `permute`/`expand`, and `clone` of a
tensor that is already contiguous.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true, sym_eq

from compiled_llm.passes.base import CompilerPass

aten = torch.ops.aten
_RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _val(arg: Any) -> torch.Tensor | None:
    v = arg.meta.get("val") if isinstance(arg, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dim() == b.dim() and statically_known_true(sym_eq(tuple(a.shape), tuple(b.shape)))


def _is_full_slice(node: fx.Node, x: torch.Tensor) -> bool:
    # Symbolic bounds are nodes (sym_size, ...) whose value is the SymInt.
    if node.kwargs or any(isinstance(a, fx.Node) and "val" not in a.meta for a in node.args[1:]):
        return False
    args: list[Any] = [a.meta["val"] if isinstance(a, fx.Node) else a for a in node.args]
    args += [None] * (5 - len(args))
    dim, start, end, step = (args[1] or 0), (args[2] or 0), args[3], (args[4] or 1)
    dim = dim % x.dim()
    return (
        statically_known_true(sym_eq(start, 0))
        and step == 1
        and (end is None or statically_known_true(end >= x.shape[dim]))
    )


def _noop_source(node: fx.Node) -> fx.Node | None:
    """The node's input if the node returns that input unchanged, else None."""
    x = node.args[0] if node.args else None
    xv, out = _val(x), _val(node)
    if xv is None or out is None or not isinstance(x, fx.Node):
        return None
    target = node.target
    if target in _RESHAPES or target is aten.expand.default:
        same = _same_shape(xv, out)
    elif target is aten.slice.Tensor:
        same = _is_full_slice(node, xv)
    elif target is aten.permute.default:
        same = list(node.args[1]) == list(range(xv.dim()))  # type: ignore[arg-type]
    elif target is aten.clone.default:
        fmt = node.kwargs.get("memory_format")
        same = fmt in (None, torch.contiguous_format, torch.preserve_format) and (
            xv.is_contiguous() and out.is_contiguous()
        )
    else:
        return None
    return x if same and xv.dtype == out.dtype else None


def _mutated(node: fx.Node) -> bool:
    """Whether some user writes into node's result (then a copy is not a no-op)."""
    for user in node.users:
        schema = getattr(user.target, "_schema", None)
        if schema is not None and schema.is_mutable:
            return True
    return False


class NoopEliminationPass(CompilerPass):
    name = "noop_elimination"
    description = (
        "drops reshapes/views/slices/copies that return their input; collapses view chains"
    )
    enabled_by_default = True

    def apply(self, graph: fx.Graph) -> int:
        count = 0
        for node in list(graph.nodes):
            if node.op != "call_function":
                continue
            source = _noop_source(node)
            if source is not None:
                # An output that would alias a graph input must stay, and so must a copy that
                # someone writes into or that protects a graph input (written back at the end).
                if source.op == "placeholder" and any(u.op == "output" for u in node.users):
                    continue
                if node.target is aten.clone.default and (
                    source.op == "placeholder" or _mutated(node)
                ):
                    continue
                node.replace_all_uses_with(source)
                graph.erase_node(node)
                count += 1
            elif node.target in _RESHAPES and self._collapse(node):
                count += 1
        return count

    @staticmethod
    def _collapse(node: fx.Node) -> bool:
        """reshape(reshape(y, a), b) -> reshape(y, b): the intermediate shape is irrelevant."""
        inner = node.args[0]
        if not (isinstance(inner, fx.Node) and inner.target in _RESHAPES):
            return False
        source = inner.args[0]
        sv = _val(source)
        if sv is None or (node.target is not aten.reshape.default and not sv.is_contiguous()):
            return False
        node.args = (source, *node.args[1:])
        return True
