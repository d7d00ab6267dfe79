"""A small harness for pass tests: compile a function with torch.compile + Inductor, run the
chosen passes at their stage, and record how many of each op the graphs held before and after.

Post-grad passes see exactly what they see in the engine: Inductor's post-grad graph, after its
own decompositions and pattern passes. Graph-stage passes see Dynamo's graph and its real inputs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from compiled_llm.passes.base import CompilerPass, PassContext
from compiled_llm.passes.manager import PassPipeline
from compiled_llm.passes.registry import get_pass


def op_name(node: fx.Node) -> str:
    """`aten.add.Tensor`, `compiled_llm.fused_add_rms_norm.default`, `torch._C._nn.linear`."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__name__', target)}"


def op_counts(graph: fx.Graph) -> Counter[str]:
    return Counter(op_name(n) for n in graph.nodes if n.op == "call_function")


@dataclass
class Compiled:
    fn: Callable[..., Any]
    pipeline: PassPipeline
    before: Counter[str] = field(default_factory=Counter)  # summed over the graphs compiled
    after: Counter[str] = field(default_factory=Counter)
    graphs: list[str] = field(default_factory=list)  # each graph after the passes, as text

    def matches(self, name: str) -> int:
        return self.pipeline.stats[name].matches()


class _Recorder(CustomGraphPass):
    def __init__(self, compiled: Compiled, stage: str) -> None:
        self.compiled = compiled
        self.stage = stage

    def __call__(self, graph: fx.Graph, example_inputs: Sequence[Any] = ()) -> None:
        c = self.compiled
        c.before.update(op_counts(graph))
        c.pipeline.run_stage(self.stage, graph, tuple(example_inputs))
        c.after.update(op_counts(graph))
        c.graphs.append(str(graph))

    def uuid(self) -> None:
        return None  # never served from Inductor's cache: the passes must run


def compile_with_passes(
    fn: Callable[..., Any],
    passes: Sequence[str | type[CompilerPass]],
    dtype: torch.dtype = torch.float32,
    stage: str = "post_grad",
    inductor: bool = True,
) -> Compiled:
    """`fn` compiled with `passes` run at `stage`; call `.fn` with inputs whose dim 0 is marked
    dynamic (as the engine's num_tokens is). With `inductor=False` (graph stage only) the
    rewritten Dynamo graph runs eagerly."""
    classes = [get_pass(p) if isinstance(p, str) else p for p in passes]
    pipeline = PassPipeline(classes, PassContext("cpu", dtype, "torch"))
    compiled = Compiled(fn, pipeline)
    recorder = _Recorder(compiled, stage)

    def backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        from torch._inductor.compile_fx import compile_fx

        if stage == "graph":
            recorder(gm.graph, example_inputs)
            gm.recompile()
            return compile_fx(gm, list(example_inputs)) if inductor else gm.forward
        return compile_fx(
            gm, list(example_inputs), config_patches={"post_grad_custom_post_pass": recorder}
        )

    torch._dynamo.reset()
    compiled.fn = torch.compile(fn, backend=backend, fullgraph=True)
    return compiled


def dynamic(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Mark dim 0 of each tensor dynamic, as the engine does for num_tokens."""
    for t in tensors:
        torch._dynamo.mark_dynamic(t, 0)
    return tensors
