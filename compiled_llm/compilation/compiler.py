"""Compile the model forward once: the one entry point the model runner uses at -O1/-O2.

`torch.compile(model.forward, fullgraph=True, backend=<ours>)` with num_tokens (dim 0 of the
token ids and positions) marked dynamic and size-oblivious, so batches of 1 token and 8,000
tokens, prefill or decode, all run the same graph: no recompilation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.fx.experimental._config as fx_config
from torch import fx, nn

from compiled_llm.attention_backends.ops import backend_ops
from compiled_llm.compilation.backend import CompilerBackend, CompileStats
from compiled_llm.compilation.cache import CompileCache, engine_key
from compiled_llm.compilation.cuda_graphs import GraphPool, PiecewiseGraph, default_capture_sizes
from compiled_llm.config import EngineConfig
from compiled_llm.envs import Envs
from compiled_llm.passes.base import PassContext
from compiled_llm.passes.manager import PassPipeline
from compiled_llm.passes.registry import resolve_pipeline

logger = logging.getLogger(__name__)

DEFAULT_SPLITTING_OPS = ("kv_write", "attention")


def splitting_predicate(backend_name: str, names: tuple[str, ...]) -> Callable[[fx.Node], bool]:
    ops = backend_ops(backend_name)
    by_name = {"kv_write": ops.kv_write, "attention": ops.attention}
    unknown = set(names) - set(by_name)
    if unknown:
        raise ValueError(f"splitting_ops must be among {sorted(by_name)}, got {sorted(unknown)}")
    targets = {by_name[n] for n in names}
    return lambda node: node.op == "call_function" and node.target in targets


def make_cache(config: EngineConfig, pipeline: PassPipeline, backend_name: str) -> CompileCache:
    envs = Envs.read()
    root = config.compilation_config.compile_cache_dir or f"{envs.cache_dir}/compile"
    mc = config.model_config
    key = engine_key(
        {
            "model": mc.hf_config.to_json_string(use_diff=False),
            "dtype": str(mc.dtype),
            "max_model_len": mc.max_model_len,
            "device": config.device.type,
            "attention_backend": backend_name,
            "passes": pipeline.uuid(),
            "splitting_ops": config.compilation_config.splitting_ops,
        }
    )
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
        ctx = PassContext(
            device_type=config.device.type,
            dtype=config.model_config.dtype,
            attention_backend=backend_name,
        )
        self.pipeline = PassPipeline(resolve_pipeline(cc.passes), ctx, cc.compile_dump_dir)
        splitting_ops = DEFAULT_SPLITTING_OPS if cc.splitting_ops is None else cc.splitting_ops
        cache = None
        if not Envs.read().disable_compile_cache:
            cache = make_cache(config, self.pipeline, backend_name)
        self.graph_pool: GraphPool | None = None
        wrap_piece = None
        if cc.level >= 2 and config.device.type == "cuda":
            sizes = cc.cudagraph_capture_sizes or default_capture_sizes()
            self.graph_pool = GraphPool(config.device, max(sizes), static_ptrs=set())
            pool = self.graph_pool
            wrap_piece = lambda _name, piece: PiecewiseGraph(piece, pool)  # noqa: E731
        self.backend = CompilerBackend(
            self.pipeline, splitting_predicate(backend_name, splitting_ops), cache, wrap_piece
        )
        self._compiled = torch.compile(
            model.forward,
            fullgraph=True,
            backend=self.backend,
            dynamic=False,
            options={"guard_filter_fn": _drop_shape_guards},
        )
        self._traced = False

    @property
    def stats(self) -> CompileStats:
        return self.backend.stats

    @property
    def cache(self) -> CompileCache | None:
        return self.backend.cache

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor) -> Any:
        if self._traced:
            return self._compiled(input_ids, positions)
        if input_ids.shape[0] < 2:
            raise ValueError("the first (compiling) call needs at least 2 tokens")
        torch._dynamo.mark_dynamic(input_ids, 0)
        torch._dynamo.mark_dynamic(positions, 0)
        start = time.perf_counter()
        dynamo_limits = torch._dynamo.config.patch(
            recompile_limit=1024, accumulated_recompile_limit=4096
        )
        with fx_config.patch(backed_size_oblivious=True), dynamo_limits:  # type: ignore[attr-defined]
            out = self._compiled(input_ids, positions)
        s = self.backend.stats
        total = time.perf_counter() - start
        s.trace_s = max(0.0, total - s.passes_s - s.inductor_s - s.load_s)
        self._traced = True
        logger.info(
            "%s compile in %.2f s: trace %.2f s, passes %.2f s, inductor %.2f s, load %.2f s",
            "warm" if s.warm else "cold",
            total,
            s.trace_s,
            s.passes_s,
            s.inductor_s,
            s.load_s,
        )
        return out
