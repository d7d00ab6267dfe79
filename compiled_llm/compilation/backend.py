"""Our torch.compile backend: graph passes, split at attention, Inductor per unique piece.

Dynamo hands us the whole forward once (num_tokens symbolic). We run the graph-stage passes
(attention lowering first), split at the attention ops, and compile each remaining piece with
Inductor — running our post-grad passes inside it. Pieces with the same structure (the decoder
layers) share one compiled artifact, and artifacts persist in the compile cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import detect_fake_mode
from tqdm.auto import tqdm

from compiled_llm.compilation.cache import CompileCache
from compiled_llm.compilation.graph_cache import graph_blob
from compiled_llm.compilation.split import split_graph, structural_key
from compiled_llm.passes.manager import PassPipeline

logger = logging.getLogger(__name__)


@dataclass
class CompileStats:
    """Seconds per stage of one compilation, and what the cache did."""

    trace_s: float = 0.0  # Dynamo tracing plus the first run of the compiled graph
    passes_s: float = 0.0  # graph-stage passes + splitting
    inductor_s: float = 0.0  # compiling pieces (post-grad passes included)
    load_s: float = 0.0  # loading cached pieces (and the saved graph, on a warm start)
    dynamo_skipped: bool = False  # warm start from the saved split graph (graph_cache.py)
    num_pieces: int = 0
    num_unique: int = 0
    cache_hits: int = 0
    instances: dict[str, int] = field(default_factory=dict)  # piece key -> pieces sharing it

    @property
    def warm(self) -> bool:
        return self.num_unique > 0 and self.cache_hits == self.num_unique


@dataclass
class Capture:
    """What the compilation saw, for saving the split graph (graph_cache.py)."""

    example_inputs: list[Any]
    sources: list[Any]  # Dynamo's source of each graph input
    graph: bytes  # the split graph without its compiled pieces, pickled
    pieces: dict[str, tuple[str, bool]] = field(default_factory=dict)  # name -> (key, single)
    outputs: tuple[Any, ...] | None = None  # what the split graph returned on its first call


class CompiledPiece(torch.nn.Module):
    """Calls an Inductor artifact; a module so it can replace the piece in the split graph.
    Artifacts return a sequence of outputs; a piece whose graph returns one value gets it back
    unwrapped, as the split graph expects."""

    def __init__(self, artifact: Callable[..., Any], key: str, single_output: bool) -> None:
        super().__init__()
        self.artifact = artifact
        self.key = key
        self.single_output = single_output

    def forward(self, *args: Any) -> Any:
        out = self.artifact(*args)
        if self.single_output and isinstance(out, list | tuple):
            return out[0]
        return tuple(out) if isinstance(out, list) else out


class CompilerBackend:
    def __init__(
        self,
        pipeline: PassPipeline,
        is_splitting_op: Callable[[fx.Node], bool],
        cache: CompileCache | None,
        wrap_piece: Callable[[str, torch.nn.Module], torch.nn.Module] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.is_splitting_op = is_splitting_op
        self.cache = cache
        self.wrap_piece = wrap_piece
        self.stats = CompileStats()
        self.split_gm: fx.GraphModule | None = None
        self.graph: fx.GraphModule | None = None  # after graph-stage passes, before splitting
        self.capture: Capture | None = None  # with a cache: for saving the split graph

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        start = time.perf_counter()
        sources = [
            getattr(n.meta.get("grapharg"), "source", None)
            for n in gm.graph.nodes
            if n.op == "placeholder"
        ]
        self.pipeline.run_stage("graph", gm.graph, example_inputs=tuple(example_inputs))
        gm.recompile()
        self.graph = gm
        split_gm, is_split_piece = split_graph(gm, self.is_splitting_op)
        if self.cache is not None:
            self.capture = Capture(
                list(example_inputs), sources, graph_blob(split_gm, is_split_piece)
            )
            self._record_first_outputs(split_gm, self.capture)
        self.stats.passes_s += time.perf_counter() - start
        fake_mode = detect_fake_mode(example_inputs)
        assert fake_mode is not None, "Dynamo provides a fake mode with its shape environment"
        num_pieces = sum(not split for split in is_split_piece.values())
        with tqdm(
            total=num_pieces,
            desc="compiling pieces (Inductor, each unique piece once)",
            unit="piece",
            disable=not logger.isEnabledFor(logging.INFO),
        ) as progress:
            compiler = _PieceCompiler(self, split_gm, is_split_piece, fake_mode, progress.update)
            compiler.run_fake(example_inputs)
        self.split_gm = split_gm
        logger.debug(
            "compiled %d pieces (%d unique, %d from cache): passes %.2f s, inductor %.2f s, "
            "cache load %.2f s",
            self.stats.num_pieces,
            self.stats.num_unique,
            self.stats.cache_hits,
            self.stats.passes_s,
            self.stats.inductor_s,
            self.stats.load_s,
        )
        return split_gm

    @staticmethod
    def _record_first_outputs(split_gm: fx.GraphModule, capture: Capture) -> None:
        def hook(_module: Any, _args: Any, out: Any) -> None:
            capture.outputs = tuple(out) if isinstance(out, list | tuple) else (out,)
            handle.remove()

        handle = split_gm.register_forward_hook(hook)


class _PieceCompiler(fx.Interpreter):
    """Propagates fake tensors through the split graph, compiling pieces as it reaches them
    (each needs its inputs' symbolic shapes)."""

    def __init__(
        self,
        backend: CompilerBackend,
        split_gm: fx.GraphModule,
        is_split_piece: dict[str, bool],
        fake_mode: Any,
        on_piece: Callable[[], object],
    ) -> None:
        super().__init__(split_gm)
        self.on_piece = on_piece
        self.backend = backend
        self.split_gm = split_gm
        self.is_split_piece = is_split_piece
        self.fake_mode = fake_mode
        self.compiled: dict[str, CompiledPiece] = {}
        self.fake_outputs: dict[str, Any] = {}  # piece key -> its fake outputs

    def run_fake(self, example_inputs: Sequence[Any]) -> None:
        # Under the Python dispatcher, as Dynamo runs fake ops: without it a C++ decomposition
        # reads plain sizes and guards the symbolic token count to the compiling call's (on
        # CUDA, the transformers fallback's batched RoPE matmul pinned it to 16).
        with self.fake_mode, enable_python_dispatcher():
            args = [
                self.fake_mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                for a in example_inputs
            ]
            self.run(*args)

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        name = str(target)
        if self.is_split_piece[name]:
            return super().call_module(target, args, kwargs)
        piece = getattr(self.split_gm, name)
        stats = self.backend.stats
        stats.num_pieces += 1
        key = structural_key(piece, args)
        # Pieces with one key compute one function of inputs with the same metadata, so their
        # outputs' metadata (all that the fake tensors carry) is the same too: propagate once.
        out = self.fake_outputs.get(key)
        if out is None:
            out = self.fake_outputs[key] = super().call_module(target, args, kwargs)
        stats.instances[key] = stats.instances.get(key, 0) + 1
        output = next(n for n in reversed(piece.graph.nodes) if n.op == "output")
        single = not isinstance(output.args[0], list | tuple)
        if self.backend.capture is not None:
            self.backend.capture.pieces[name] = (key, single)
        compiled = self.compiled.get(key)
        if compiled is None:
            compiled = self._compile(piece, args, key, single)
            self.compiled[key] = compiled
            stats.num_unique += 1
        module: torch.nn.Module = compiled
        if self.backend.wrap_piece is not None:
            module = self.backend.wrap_piece(name, compiled)
        setattr(self.split_gm, name, module)
        self.on_piece()
        return out

    def _compile(self, piece: fx.GraphModule, args: Any, key: str, single: bool) -> CompiledPiece:
        backend, stats = self.backend, self.backend.stats
        cache = backend.cache
        if cache is not None:
            start = time.perf_counter()
            artifact = cache.load(key)
            if artifact is not None:
                stats.load_s += time.perf_counter() - start
                stats.cache_hits += 1
                return CompiledPiece(artifact, key, single)
        start = time.perf_counter()
        backend.pipeline.piece_name = key
        artifact = torch._inductor.standalone_compile(
            piece,
            list(args),
            dynamic_shapes="from_tracing_context",
            options={"config_patches": {"post_grad_custom_post_pass": backend.pipeline.hook}},
        )
        stats.inductor_s += time.perf_counter() - start
        if cache is not None:
            cache.save(key, artifact)
        return CompiledPiece(artifact, key, single)
