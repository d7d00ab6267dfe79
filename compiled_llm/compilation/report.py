"""Per-pass ablation of one model, for pass developers (`compiled-llm passes report`).

The selected pipeline (the default one edited by `--passes`) is compiled once with every pass on,
then once more per optional pass with that pass off, and once with only the required passes.
Each compile runs -O1 (Inductor, no CUDA graphs) with the compile cache and Inductor's own
caches off, so every post-grad pass really runs. All variants and eager (-O0) then run the same
fixed batch in turns, so that load from other processes falls on each alike; each reports its
median step time and its largest logit difference from eager.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from compiled_llm.attention_backends.base import AttentionInputs
from compiled_llm.attention_backends.registry import create_backend
from compiled_llm.compilation.cache import no_compile_caches
from compiled_llm.compilation.compiler import CompiledModel, pass_context
from compiled_llm.config import EngineArgs
from compiled_llm.forward_context import ForwardContext, set_forward_context
from compiled_llm.models.attention import layer_attention
from compiled_llm.models.loader import load_model
from compiled_llm.passes.registry import REQUIRED, resolve_pipeline


@dataclass
class PassRow:
    name: str
    stage: str
    matches: int  # sites rewritten over the whole model (a shared piece counts once per use)
    nodes_before: int  # summed over the graphs the pass ran on
    nodes_after: int
    ms_off: float  # step time with this pass removed from the pipeline
    ms_on: float  # step time with the whole pipeline
    diff_off: float  # max |logit - eager logit| with this pass removed
    diff_on: float


@dataclass
class Report:
    model: str
    device: str
    dtype: str
    attention_backend: str
    num_tokens: int
    num_reqs: int
    steps: int
    pipeline: list[str]
    eager_ms: float
    none_ms: float  # required passes only
    none_diff: float
    all_ms: float
    all_diff: float
    rows: list[PassRow] = field(default_factory=list)


@dataclass
class _Variant:
    ms: float
    diff: float
    compiled: Any  # compiled_llm.compilation.compiler.CompiledModel


class _Bench:
    """The model, its attention backend and one fixed batch, shared by every variant."""

    def __init__(self, engine_kwargs: dict[str, Any], num_tokens: int, num_reqs: int) -> None:

        kwargs = dict(engine_kwargs, compilation_level=1, enforce_eager=False)
        self.config = EngineArgs.from_kwargs(**kwargs).create_config()
        mc = self.config.model_config
        self.device = self.config.device
        self.model = load_model(mc, self.device)
        block_size = self.config.cache_config.block_size
        spec = mc.attention_spec(
            block_size, self.device, layer_attention(self.model, mc.num_layers)
        )
        self.backend = create_backend(self.config.attention_backend, spec)
        self.backend_name = self.backend.name
        self._inputs(num_tokens, num_reqs, block_size, int(mc.hf_config.vocab_size))
        self.kv_caches = self.backend.allocate_kv_caches(self.num_blocks, mc.num_layers)

    def _inputs(self, num_tokens: int, num_reqs: int, block_size: int, vocab: int) -> None:
        """`num_reqs` prefills of equal length from position 0, in disjoint cache blocks."""

        q_lens = np.full(num_reqs, num_tokens // num_reqs, dtype=np.int64)
        q_lens[-1] += num_tokens - q_lens.sum()
        width = -(-int(q_lens.max()) // block_size)
        self.num_blocks = num_reqs * width
        block_table = np.arange(self.num_blocks, dtype=np.int32).reshape(num_reqs, width)
        self.attn, positions = AttentionInputs.from_batch(
            q_lens, q_lens, block_table, block_size, self.device
        )
        gen = torch.Generator().manual_seed(0)
        self.input_ids = torch.randint(0, vocab, (num_tokens,), generator=gen).to(self.device)
        self.positions = torch.from_numpy(positions).to(self.device)

    @torch.inference_mode()
    def logits(self, forward: Callable[..., torch.Tensor]) -> torch.Tensor:

        metadata = self.backend.build_metadata(self.attn)
        with set_forward_context(ForwardContext(self.backend, self.kv_caches, metadata)):
            hidden = forward(self.input_ids, self.positions)
        return self.model.compute_logits(hidden)

    def time_ms(self, forwards: list[Callable[..., torch.Tensor]], steps: int) -> list[float]:
        """Median step time of each forward, timed in turns so that load from other processes
        falls on all of them alike."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        times: list[list[float]] = [[] for _ in forwards]
        for step in range(steps + 2):  # the first two rounds warm up
            for forward, samples in zip(forwards, times):
                sync()
                start = time.perf_counter()
                self.logits(forward)
                sync()
                if step >= 2:
                    samples.append(time.perf_counter() - start)
        return [statistics.median(t) * 1e3 for t in times]

    def compile(self, edits: list[str]) -> Any:
        """A compiled variant. Variants coexist: Dynamo keeps one cache entry per backend."""

        cc = dataclasses.replace(self.config.compilation_config, passes=tuple(edits), level=1)
        config = dataclasses.replace(self.config, compilation_config=cc)
        compiled = CompiledModel(self.model, config, self.backend_name)
        self.logits(compiled)  # compiles
        return compiled


def run_report(
    engine_kwargs: dict[str, Any], num_tokens: int = 32, num_reqs: int = 4, steps: int = 10
) -> Report:
    edits = list(engine_kwargs.get("passes") or [])
    bench = _Bench(engine_kwargs, num_tokens, num_reqs)
    ctx = pass_context(bench.config, bench.backend_name)
    selected = [cls.name for cls in resolve_pipeline(edits, ctx)]
    optional = [n for n in selected if n not in REQUIRED]
    eager = bench.logits(bench.model.forward)
    # Pipelines to compile: all selected passes, each one left out, only the required ones.
    removals = [[], *([n] for n in optional), optional]
    variants: dict[tuple[str, ...], _Variant] = {}
    torch._dynamo.reset()
    with no_compile_caches():
        for removed in removals:
            key = tuple(n for n in selected if n not in removed)
            if key not in variants:
                compiled = bench.compile(edits + [f"-{n}" for n in removed])
                diff = (bench.logits(compiled) - eager).abs().max().item()
                variants[key] = _Variant(0.0, diff, compiled)
    forwards = [bench.model.forward] + [v.compiled for v in variants.values()]
    pieces = [v.compiled.stats.num_pieces for v in variants.values()]
    eager_ms, *variant_ms = bench.time_ms(forwards, steps)
    if pieces != [v.compiled.stats.num_pieces for v in variants.values()]:
        raise RuntimeError("a variant was recompiled while being timed")
    for v, ms in zip(variants.values(), variant_ms):
        v.ms = ms

    def without(*names: str) -> _Variant:
        return variants[tuple(n for n in selected if n not in names)]

    full, none = without(), without(*optional)
    rows = []
    for name in optional:
        off = without(name)
        s = full.compiled.pipeline.stats[name]
        p = next(p for p in full.compiled.pipeline.passes if p.name == name)
        rows.append(
            PassRow(
                name=name,
                stage=p.stage,
                matches=s.matches(full.compiled.stats.instances),
                nodes_before=s.nodes_before,
                nodes_after=s.nodes_after,
                ms_off=off.ms,
                ms_on=full.ms,
                diff_off=off.diff,
                diff_on=full.diff,
            )
        )
    mc = bench.config.model_config
    return Report(
        model=mc.model,
        device=str(bench.device),
        dtype=str(mc.dtype).removeprefix("torch."),
        attention_backend=bench.backend_name,
        num_tokens=num_tokens,
        num_reqs=num_reqs,
        steps=steps,
        pipeline=selected,
        eager_ms=eager_ms,
        none_ms=none.ms,
        none_diff=none.diff,
        all_ms=full.ms,
        all_diff=full.diff,
        rows=rows,
    )
