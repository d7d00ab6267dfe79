"""Compile the model forward once: the one entry point the model runner uses at -O1/-O2.

`torch.compile(model.forward, fullgraph=True, backend=<ours>)` with num_tokens (dim 0 of the
token ids and positions) marked dynamic and size-oblivious, so batches of 1 token and 8,000
tokens, prefill or decode, all run the same graph: no recompilation.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import pickle
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.fx.experimental._config as fx_config
from torch import fx, nn
from torch.utils import _pytree as pytree

from compiled_llm.attention_backends.ops import backend_ops
from compiled_llm.compilation.backend import CompiledPiece, CompilerBackend, CompileStats
from compiled_llm.compilation.cache import CompileCache, engine_key, no_compile_caches
from compiled_llm.compilation.cuda_graphs import (
    CudaGraphWrapper,
    GraphMode,
    GraphPool,
    default_piecewise_sizes,
)
from compiled_llm.compilation.graph_cache import FORMAT as GRAPH_FORMAT
from compiled_llm.compilation.graph_cache import (
    SavedGraph,
    SavedGraphForward,
    describe_inputs,
    probed_vec_isa,
    recorded_vec_isa,
    storage_groups,
)
from compiled_llm.config import EngineConfig
from compiled_llm.envs import Envs
from compiled_llm.models.registry import EAGLE3_ARCHITECTURES
from compiled_llm.passes.base import PassContext
from compiled_llm.passes.manager import PassPipeline
from compiled_llm.passes.registry import resolve_pipeline

logger = logging.getLogger(__name__)

GRAPH_ENTRY = "graph"  # the compile-cache entry of the saved split graph


def splitting_predicate(backend_name: str) -> Callable[[fx.Node], bool]:
    """Selects the graph nodes the graph is split at: the backend's KV write (plain, or fused
    with RoPE, with the getitems unpacking its (q_rot, dep) result, so the whole fused write runs
    in the eager attention piece) and attention. Nowhere else: the pieces between them are then
    identical across layers (compiled once), and CUDA graphs of the pieces hold no KV-cache
    address or attention metadata."""
    ops = backend_ops(backend_name)
    targets = {op for op in (ops.kv_write, ops.rope_kv_write, ops.attention) if op is not None}

    def is_splitting(node: fx.Node) -> bool:
        if node.op != "call_function":
            return False
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
            return is_splitting(node.args[0])
        return node.target in targets

    return is_splitting


def pass_context(config: EngineConfig, backend_name: str) -> PassContext:
    """What the passes of this engine may depend on (and its default pipeline)."""
    quantization = config.model_config.quantization
    return PassContext(
        device_type=config.device.type,
        dtype=config.model_config.dtype,
        attention_backend=backend_name,
        quantization=quantization.method if quantization is not None else None,
    )


def make_cache(config: EngineConfig, pipeline: PassPipeline, backend_name: str) -> CompileCache:
    envs = Envs.read()
    root = config.compilation_config.compile_cache_dir or f"{envs.cache_dir}/compile"
    mc = config.model_config
    items: dict[str, Any] = {
        "model": mc.hf_config.to_json_string(use_diff=False),
        "model_impl": mc.model_impl,  # native and fallback classes trace different graphs
        # quantized layers trace other ops (and random weights are quantized at load)
        "quantization": [repr(mc.quantization), mc.load_format if mc.quantization else None],
        "dtype": str(mc.dtype),
        "max_model_len": mc.max_model_len,
        "device": str(config.device),
        "attention_backend": backend_name,
        "passes": pipeline.uuid(),
        # a rank's pieces hold its shard's widths and its collectives
        "tensor_parallel": [
            config.parallel_config.rank,
            config.parallel_config.tensor_parallel_size,
        ],
    }
    spec = config.speculative_config
    if spec is not None and spec.eagle_aux_hidden_state_layer_ids:
        # the forward also returns these layers' inputs (models/aux_hidden.py)
        items["aux_hidden_layers"] = list(spec.eagle_aux_hidden_state_layer_ids)
    if mc.architecture in EAGLE3_ARCHITECTURES:
        # the head's hidden-state input buffer is a graph input of this many rows
        items["max_num_batched_tokens"] = config.scheduler_config.max_num_batched_tokens
    key = engine_key(items)
    return CompileCache(root, key)


def _drop_shape_guards(entries: list[Any]) -> list[bool]:
    """Keep Dynamo's guards except the symbolic-shape ones: num_tokens is the only dynamic size
    and the graph is valid for every value of it, 1 included (tracing assumes >= 2; backed
    size-oblivious tracing keeps the graph free of that assumption)."""
    return [e.guard_type != "SHAPE_ENV" for e in entries]


class CompiledModel:
    """Callable like `model.forward(input_ids, positions)`; compiles on the first call."""

    def __init__(self, model: nn.Module, config: EngineConfig, backend_name: str) -> None:
        cc = config.compilation_config
        ctx = pass_context(config, backend_name)
        self.pipeline = PassPipeline(resolve_pipeline(cc.passes, ctx), ctx, cc.compile_dump_dir)
        # Graph dumps need every stage to run: a cached start would skip them (Dynamo and the
        # graph passes on a warm start, our post-grad passes on an Inductor cache hit).
        self.fresh = cc.compile_dump_dir is not None
        cache = None
        if self.fresh:
            logger.info(
                "graph dumps go to %s: compiling without the compile and Inductor caches",
                cc.compile_dump_dir,
            )
        elif not Envs.read().disable_compile_cache:
            cache = make_cache(config, self.pipeline, backend_name)
        self.graph_pool: GraphPool | None = None
        wrap_piece = None
        if cc.level >= 2 and config.device.type == "cuda":
            sizes = cc.cudagraph_capture_sizes or default_piecewise_sizes()
            self.graph_pool = GraphPool(config.device, max(sizes), static_ptrs=set())
            pool = self.graph_pool
            wrap_piece = lambda _name, piece: CudaGraphWrapper(piece, pool, GraphMode.PIECEWISE)  # noqa: E731
        self.backend = CompilerBackend(
            self.pipeline, splitting_predicate(backend_name), cache, wrap_piece
        )
        self.model = model
        self.backend_name = backend_name
        self._forward: Callable[..., Any] | None = None

    @property
    def stats(self) -> CompileStats:
        return self.backend.stats

    @property
    def cache(self) -> CompileCache | None:
        return self.backend.cache

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor) -> Any:
        if self._forward is None:
            return self._first_call(input_ids, positions)
        return self._forward(input_ids, positions)

    def _first_call(self, input_ids: torch.Tensor, positions: torch.Tensor) -> Any:
        with no_compile_caches() if self.fresh else contextlib.nullcontext():
            return self._compile(input_ids, positions)

    def _compile(self, input_ids: torch.Tensor, positions: torch.Tensor) -> Any:
        start = time.perf_counter()
        s = self.backend.stats
        self._forward = self._from_saved_graph()
        if self._forward is not None:
            out = self._forward(input_ids, positions)
            s.trace_s = max(0.0, time.perf_counter() - start - s.load_s)  # the first run
        else:
            logger.info(
                "compiling the model (the first start with these settings; later starts load "
                "the result from the compile cache)"
            )
            out = self._trace(input_ids, positions)
            s.trace_s = max(0.0, time.perf_counter() - start - s.passes_s - s.inductor_s - s.load_s)
            self._save_graph((input_ids, positions), out)
        logger.info(
            "%s compile in %.2f s: %s %.2f s, passes %.2f s, inductor %.2f s, load %.2f s",
            "warm" if s.warm else "cold",
            time.perf_counter() - start,
            "first run (Dynamo skipped)" if s.dynamo_skipped else "trace",
            s.trace_s,
            s.passes_s,
            s.inductor_s,
            s.load_s,
        )
        return out

    def _trace(self, input_ids: torch.Tensor, positions: torch.Tensor) -> Any:
        if input_ids.shape[0] < 2:
            raise ValueError("the first (compiling) call needs at least 2 tokens")
        torch._dynamo.mark_dynamic(input_ids, 0)
        torch._dynamo.mark_dynamic(positions, 0)
        dynamo_limits = torch._dynamo.config.patch(
            recompile_limit=1024, accumulated_recompile_limit=4096
        )
        # Made here, not at construction: a warm start never calls it, and making it imports
        # Dynamo's debugging and repro modules.
        compiled = torch.compile(
            self.model.forward,
            fullgraph=True,
            backend=self.backend,
            dynamic=False,
            options={"guard_filter_fn": _drop_shape_guards},
        )
        with fx_config.patch(backed_size_oblivious=True), dynamo_limits:  # type: ignore[attr-defined]
            out = compiled(input_ids, positions)
        self._forward = compiled
        return out

    def _save_graph(self, call_args: tuple[torch.Tensor, ...], out: Any) -> None:
        """After a traced start: save what lets the next start skip Dynamo (graph_cache.py)."""
        capture, cache = self.backend.capture, self.backend.cache
        self.backend.capture = None  # holds the first call's inputs
        if capture is None or cache is None or capture.outputs is None:
            return
        leaves, spec = pytree.tree_flatten(out)
        same = len(leaves) == len(capture.outputs) and all(
            a is b for a, b in zip(leaves, capture.outputs, strict=True)
        )
        inputs = describe_inputs(
            self.model.forward, self.model, call_args, capture.example_inputs, capture.sources
        )
        if not same or inputs is None:
            logger.info("graph inputs or outputs not describable; warm starts will trace")
            return
        saved = SavedGraph(
            format=GRAPH_FORMAT,
            graph=capture.graph,
            pieces=capture.pieces,
            inputs=inputs,
            storage_groups=storage_groups(inputs, capture.example_inputs),
            out_spec=pytree.treespec_dumps(spec),
            vec_isa=probed_vec_isa(),
        )
        cache.save_bytes(GRAPH_ENTRY, saved.dumps())

    def _from_saved_graph(self) -> Callable[..., Any] | None:
        """The split graph saved by an earlier start with all its pieces, or None."""
        cache = self.backend.cache
        if cache is None:
            return None
        start = time.perf_counter()
        saved = cache.load_bytes(GRAPH_ENTRY, SavedGraph.loads)
        if saved is None:
            return None
        hits, misses = cache.hits, cache.misses
        try:
            backend_ops(self.backend_name)  # the graph's code calls the backend's ops
            gm = pickle.loads(saved.graph)
            compiled: dict[str, CompiledPiece] = {}
            with recorded_vec_isa(saved.vec_isa):
                for name, (key, single) in saved.pieces.items():
                    if key not in compiled:
                        artifact = cache.load(key)
                        if artifact is None:
                            raise LookupError(f"compiled piece {key} is missing")
                        compiled[key] = CompiledPiece(artifact, key, single)
                    piece: torch.nn.Module = compiled[key]
                    if self.backend.wrap_piece is not None:
                        piece = self.backend.wrap_piece(name, piece)
                    setattr(gm, name, piece)
            forward = SavedGraphForward(gm, saved, self.model, num_args=2)
        except Exception as e:  # noqa: BLE001 - fall back to tracing, which rebuilds what is missing
            logger.warning("cannot use the saved graph (%s); tracing with Dynamo", e)
            cache.hits, cache.misses = hits, misses
            return None
        s = self.backend.stats
        s.dynamo_skipped = True
        s.load_s += time.perf_counter() - start
        s.num_pieces = len(saved.pieces)
        s.num_unique = s.cache_hits = len(compiled)
        for key, _ in saved.pieces.values():
            s.instances[key] = s.instances.get(key, 0) + 1
        return forward
