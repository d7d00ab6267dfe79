"""Find plain-PyTorch functions in the Dynamo graph that graph-stage passes rewrite.

Dynamo's graph is torch-level and its spelling is Dynamo's own: `x.chunk(2, dim=-1)` is a
`call_method` node with `dim` as a keyword, `cos.to(x.dtype)` carries the dtype as a literal and
`x * c` is `operator.mul`. A pattern written against those details by hand breaks when they
change, so `TorchPattern(fn, example_inputs)` captures `fn` with Dynamo itself and matches the
result with torch.fx's `SubgraphMatcher`: the pattern is spelled exactly as the model graph is,
for the dtype and device of the example inputs (a `.to(torch.bfloat16)` is a node in a bf16
graph and a different literal in a float32 one).

Capture runs Dynamo, so patterns are built when a pass is constructed, outside any compilation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.fx.passes.utils.matcher_utils import SubgraphMatcher


@dataclass(frozen=True)
class PatternMatch:
    """One occurrence of a pattern: what its arguments and results are in the graph."""

    inputs: dict[str, Any]  # fn's argument name -> the graph node (or literal) bound to it
    outputs: list[fx.Node]  # the graph nodes computing the function's results, in order
    nodes: list[fx.Node]  # every graph node the pattern's computation covers


def capture(
    fn: Callable[..., Any], example_inputs: Sequence[torch.Tensor]
) -> tuple[fx.Graph, dict[fx.Node, str]]:
    """`fn`'s Dynamo graph for these (distinct) tensors, and the argument each placeholder is."""
    if torch.compiler.is_compiling():
        raise RuntimeError("a pattern is captured with Dynamo: build it outside a compilation")
    captured: list[tuple[fx.GraphModule, Sequence[Any]]] = []

    def backend(gm: fx.GraphModule, inputs: Sequence[Any]) -> Callable[..., Any]:
        captured.append((gm, inputs))
        return gm.forward

    compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)
    try:
        compiled(*example_inputs)
    finally:
        # Captures differ only by backend, and each would otherwise stay on fn's code object as
        # one more cache entry towards Dynamo's recompile limit.
        torch._dynamo.reset_code(fn.__code__)
    if not captured:
        raise RuntimeError(f"Dynamo did not capture {fn.__name__} (is it disabled?)")
    gm, inputs = captured[0]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise ValueError(
            f"{fn.__name__}'s graph has {len(placeholders)} inputs for {len(example_inputs)} "
            "arguments: pass distinct tensors, and use no tensor the function does not receive"
        )
    code = fn.__code__
    names = code.co_varnames[: code.co_argcount]
    # Dynamo orders placeholders by first use, not by argument.
    args = {
        node: names[next(i for i, x in enumerate(example_inputs) if x is value)]
        for node, value in zip(placeholders, inputs)
    }
    gm.graph.eliminate_dead_code()
    return gm.graph, args


class TorchPattern:
    """A function of tensors, found wherever the graph computes it the same way.

    A match's intermediate nodes are used only inside the match (its results may have other
    users); arguments bound more than once (`fn(x, x)`) must bind the same node."""

    def __init__(self, fn: Callable[..., Any], example_inputs: Sequence[torch.Tensor]) -> None:
        self.graph, self._args = capture(fn, example_inputs)
        self._matcher = SubgraphMatcher(self.graph, remove_overlapping_matches=True)
        output = next(n for n in reversed(self.graph.nodes) if n.op == "output")
        self._outputs: list[fx.Node] = list(output.all_input_nodes)

    def match(self, graph: fx.Graph) -> list[PatternMatch]:
        found = []
        for m in self._matcher.match(graph):
            inputs = {self._args[pn]: gn for pn, gn in m.nodes_map.items() if pn in self._args}
            nodes = [gn for pn, gn in m.nodes_map.items() if pn.op not in ("placeholder", "output")]
            found.append(PatternMatch(inputs, [m.nodes_map[o] for o in self._outputs], nodes))
        return found
