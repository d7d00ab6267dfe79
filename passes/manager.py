"""Runs the selected passes: the graph stage on the whole captured graph, the post-grad stage
inside Inductor for each compiled piece. Keeps per-pass statistics and optional graph dumps."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import fx

from compiled_llm.passes.base import CompilerPass, PassContext

logger = logging.getLogger(__name__)


@dataclass
class PassStats:
    matches_by_graph: dict[str, int] = field(default_factory=dict)  # graph (piece key) -> count
    nodes_before: int = 0
    nodes_after: int = 0
    seconds: float = 0.0
    runs: int = 0

    def matches(self, instances: dict[str, int] | None = None) -> int:
        """Sites rewritten; with `instances`, each compiled piece counts once per use."""
        instances = instances or {}
        return sum(n * instances.get(g, 1) for g, n in self.matches_by_graph.items())


class PassPipeline:
    def __init__(
        self,
        classes: list[type[CompilerPass]],
        ctx: PassContext,
        dump_dir: str | None = None,
    ) -> None:
        self.passes = [cls(ctx) for cls in classes]
        self.dump_dir = dump_dir
        self.stats: dict[str, PassStats] = {p.name: PassStats() for p in self.passes}
        self.piece_name = "graph"  # which graph the post-grad stage is working on
        self.hook = PostGradHook(self)

    def uuid(self) -> str:
        return hashlib.sha256("|".join(p.uuid() for p in self.passes).encode()).hexdigest()

    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    @contextlib.contextmanager
    def eager(self) -> Iterator[None]:
        """Run eager code (the output head) under the passes' eager counterparts
        (`CompilerPass.eager_mode`)."""
        with contextlib.ExitStack() as stack:
            for p in self.passes:
                mode = p.eager_mode()
                if mode is not None:
                    stack.enter_context(mode)
            yield

    def run_stage(self, stage: str, graph: fx.Graph, example_inputs: tuple[Any, ...] = ()) -> None:
        if stage == "graph":
            self.piece_name = "graph"
        for index, p in enumerate(self.passes):
            if p.stage != stage:
                continue
            p.example_inputs = example_inputs
            before = len(graph.nodes)
            self._dump(graph, index, p.name, "before")
            start = time.perf_counter()
            matches = p.apply(graph)
            graph.eliminate_dead_code()
            graph.lint()
            elapsed = time.perf_counter() - start
            self._dump(graph, index, p.name, "after")
            s = self.stats[p.name]
            s.matches_by_graph[self.piece_name] = (
                s.matches_by_graph.get(self.piece_name, 0) + matches
            )
            s.nodes_before += before
            s.nodes_after += len(graph.nodes)
            s.seconds += elapsed
            s.runs += 1
            logger.debug(
                "pass %-18s %-10s matches=%d nodes %d->%d %.1f ms",
                p.name,
                self.piece_name,
                matches,
                before,
                len(graph.nodes),
                elapsed * 1e3,
            )

    def _dump(self, graph: fx.Graph, index: int, name: str, when: str) -> None:
        if not self.dump_dir:
            return
        folder = os.path.join(self.dump_dir, self.piece_name[:16])
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{index:02d}_{name}.{when}.txt"), "w") as f:
            f.write(str(graph))


class PostGradHook:
    """Inductor's `post_grad_custom_post_pass`: the pipeline's post-grad stage, with a uuid
    so Inductor's FX graph cache keys on exactly these passes. Registered as a CustomGraphPass
    (what Inductor asks for) when the first is made, so importing the passes does not import
    Inductor (and Dynamo with it): seconds of a start that never compiles."""

    def __init__(self, pipeline: PassPipeline) -> None:
        from torch._inductor.custom_graph_pass import CustomGraphPass

        CustomGraphPass.register(PostGradHook)
        self.pipeline = pipeline

    def __call__(self, graph: fx.Graph) -> None:
        self.pipeline.run_stage("post_grad", graph)

    def uuid(self) -> Any:
        return self.pipeline.uuid()
