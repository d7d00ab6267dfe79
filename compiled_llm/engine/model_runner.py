"""Turns a scheduled step into tensors, runs the model under the forward context, and samples.

Inputs are built with numpy on the host and copied once. `execute_async` launches a step and
returns at once: the sampled ids stay on the device (the next step splices them into its input
where the host does not know them yet) and reach the host by an asynchronous copy, read only
when the step's result is asked for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from compiled_llm.attention_backends.base import AttentionBackend, AttentionInputs
from compiled_llm.attention_backends.registry import create_backend
from compiled_llm.compilation.compiler import CompiledModel
from compiled_llm.config import EngineConfig
from compiled_llm.distributed.parallel import TensorParallel
from compiled_llm.distributed.plan import ShardPlan
from compiled_llm.engine.cuda_graph_runner import CudaGraphRunner
from compiled_llm.engine.scheduler import ScheduledRequest, SchedulerOutput
from compiled_llm.forward_context import ForwardContext, set_forward_context
from compiled_llm.models.attention import layer_attention
from compiled_llm.models.aux_hidden import AuxHiddenStates
from compiled_llm.models.loader import load_model
from compiled_llm.profiler import Profiler
from compiled_llm.request import Request
from compiled_llm.sampling.batch import build_sampling_batch
from compiled_llm.sampling.sampler import Sampler, SamplerOutput, SamplingBatch, token_logprobs

logger = logging.getLogger(__name__)

_DEFAULT_CPU_KV_BYTES = 2 << 30
# Prompt logprobs: rows of float32 logits made at a time (512 MiB for a 128k vocabulary).
PROMPT_LOGPROBS_ROWS = 1024
_GIB = 1 << 30


@dataclass(frozen=True)
class MemoryProfile:
    """A CUDA start's memory in bytes, measured before the KV cache exists
    (`ModelRunner._profile_memory`). The last four are this engine's own."""

    total: int  # the device's memory
    in_use_before: int  # by anyone when the engine started: other processes, this CUDA context
    weights: int  # torch memory outside the CUDA graphs: weights, buffers, workspaces
    activation_peak: int  # torch memory the largest step adds while it runs
    non_torch: int  # what torch's allocator does not see (cuBLAS, loaded kernels), graphs aside
    cuda_graphs: int  # graph pool, static buffers and graph execs; partly an estimate


def check_share_is_free(total: int, in_use: int, gpu_memory_utilization: float) -> int:
    """The engine's share, total × gpu_memory_utilization, if that much is free besides the
    `in_use` bytes other processes hold."""
    limit = int(total * gpu_memory_utilization)
    if limit > total - in_use:
        fits = math.floor(100 * (total - in_use) / total) / 100
        raise ValueError(
            f"gpu_memory_utilization={gpu_memory_utilization} asks for {limit / _GIB:.2f} GiB "
            f"of the GPU's {total / _GIB:.2f} GiB, but {in_use / _GIB:.2f} GiB were in use when "
            "the engine started (other processes, this one's CUDA context); lower "
            f"gpu_memory_utilization to {fits:.2f} or less"
        )
    return limit


def kv_cache_budget(m: MemoryProfile, gpu_memory_utilization: float) -> int:
    """KV-cache bytes such that this engine's footprint (everything `m` counts as its own, plus
    the cache) stays within total × gpu_memory_utilization. Other processes' memory is not
    charged to it, but must leave that much free; this engine's CUDA context, made before the
    first measurement, is counted as theirs (as in vLLM)."""
    limit = check_share_is_free(m.total, m.in_use_before, gpu_memory_utilization)
    used = m.weights + m.activation_peak + m.non_torch + m.cuda_graphs
    budget = limit - used
    if budget <= 0:
        raise ValueError(
            f"no GPU memory is left for the KV cache: gpu_memory_utilization="
            f"{gpu_memory_utilization} allows this engine {limit / _GIB:.2f} GiB and it needs "
            f"{used / _GIB:.2f} GiB without one (weights {m.weights / _GIB:.2f}, activation peak "
            f"{m.activation_peak / _GIB:.2f}, non-torch {m.non_torch / _GIB:.2f}, CUDA graphs "
            f"{m.cuda_graphs / _GIB:.2f}); raise gpu_memory_utilization or lower "
            "max_num_batched_tokens"
        )
    return budget


def _device_in_use(device: torch.device) -> int:
    """Bytes in use on the device by anyone, once this process has handed back what its
    allocator caches."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return total - free


@dataclass
class HostInputs:
    """A step's inputs as host arrays, before anything is on the device: what every
    tensor-parallel rank builds the same device inputs from (engine/tp_executor.py sends it)."""

    token_ids: np.ndarray  # int64; 0 where `pending_dst` says the previous step samples it
    q_lens: np.ndarray  # int64, per request: tokens fed
    seq_lens: np.ndarray  # int64, per request: tokens in its KV cache after this step
    block_table: np.ndarray  # int32 [requests, width]
    pending_dst: list[int]  # token positions sampled by the step still in flight
    pending_src: list[int]  # their rows in that step's output


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionInputs
    logits_indices: torch.Tensor  # 1 + len(drafts) rows per sampling request
    sampling_requests: list[Request]
    sampling_drafts: list[list[int]]  # each sampling request's draft tokens (speculation)


@dataclass
class LaunchedStep:
    """A step whose forward is launched and whose sampling is not (ModelRunner.launch)."""

    requests: list[Request]  # the requests that sample, in order
    logits: torch.Tensor | None  # their rows: 1 + len(drafts) each
    batch: SamplingBatch | None
    num_rows: list[int]  # rows per request
    drafts: list[list[int]]  # per request, the draft tokens its rows after the first verify

    @functools.cached_property
    def row(self) -> dict[str, int]:
        """Each request's first row in the sampled output (StepHandle.row, known before the
        sampling is launched). Computed once: the next step's inputs look up every request."""
        return first_rows(self.requests, self.num_rows)


def first_rows(requests: list[Request], num_rows: list[int]) -> dict[str, int]:
    """Each request's first row of a step's sampled output: the token the next step splices in
    for one not yet on the host (a request with drafts is never scheduled before its tokens
    are)."""
    first = np.cumsum([0, *num_rows[:-1]]).tolist()
    return {r.request_id: first[i] for i, r in enumerate(requests)}


@dataclass
class ModelRunnerOutput:
    request_ids: list[str]  # requests that sampled, in order
    token_ids: list[list[int]]  # per request, one per row: 1 + its drafts
    # per request (None: it asked for none), per row: (topk ids, topk logprobs, sampled lp, rank)
    logprobs: list[list[Any] | None] | None = None


class StepHandle:
    """A launched step: its sampled ids on the device, and their host copy once ready."""

    def __init__(
        self,
        requests: list[Request],
        out: SamplerOutput | None,
        num_rows: list[int] | None = None,
    ) -> None:
        self.requests = requests
        self.num_rows = num_rows or [1] * len(requests)
        self.row = first_rows(requests, self.num_rows)
        self.device_tokens = out.token_ids if out is not None else None
        self._out = out
        self._host: list[torch.Tensor] = []
        self._event: torch.cuda.Event | None = None
        if out is None:
            return
        tensors = [out.token_ids]
        if out.topk_ids is not None:
            tensors += [out.topk_ids, out.topk_logprobs, out.sampled_logprobs, out.sampled_ranks]  # type: ignore[list-item]
        cuda = out.token_ids.is_cuda
        for t in tensors:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda)
            host.copy_(t, non_blocking=cuda)
            self._host.append(host)
        if cuda:
            self._event = torch.cuda.Event()
            self._event.record()

    def result(self) -> ModelRunnerOutput:
        if self._out is None:
            return ModelRunnerOutput([], [])
        if self._event is not None:
            self._event.synchronize()
        ids = [r.request_id for r in self.requests]
        flat: list[int] = self._host[0].tolist()
        bounds = np.cumsum([0, *self.num_rows]).tolist()
        spans = [range(bounds[i], bounds[i + 1]) for i in range(len(self.requests))]
        tokens = [flat[span.start : span.stop] for span in spans]
        if len(self._host) == 1:
            return ModelRunnerOutput(ids, tokens)
        topk_ids, topk_lps, sampled_lps, ranks = (h.tolist() for h in self._host[1:])
        logprobs: list[list[Any] | None] = []
        for r, span in zip(self.requests, spans):
            k = r.sampling_params.logprobs
            if k is None:
                logprobs.append(None)
            else:
                logprobs.append(
                    [(topk_ids[i][:k], topk_lps[i][:k], sampled_lps[i], ranks[i]) for i in span]
                )
        return ModelRunnerOutput(ids, tokens, logprobs)


class ModelRunner:
    # What `sample` returns its launched step as (the tensor-parallel driver checks its
    # workers when a step's result is read).
    step_handle: Callable[[list[Request], SamplerOutput, list[int]], StepHandle] = StepHandle

    def __init__(
        self, config: EngineConfig, profiler: Profiler | None = None, is_draft: bool = False
    ) -> None:
        """`is_draft`: the draft model of speculative decoding (`draft_model`), run by the
        target's runner (`self.draft`): it sizes no memory of its own, and the target's KV
        cache sizing counts it."""
        self.config = config
        self.profiler = profiler or Profiler(None, False)
        self.device = config.device
        mc = config.model_config
        self.block_size = config.cache_config.block_size
        # Seconds per start stage (weights, kv_cache, compile, cudagraphs), for the ready line
        # and benchmarks/startup.py.
        self.start_seconds: dict[str, float] = {}
        # KV sizing on CUDA charges this engine with the memory used from here on.
        self._in_use_before = self._reserved_before = 0
        if self.device.type == "cuda" and not is_draft:
            gc.collect()  # an engine dropped earlier in this process may still hold memory
            self._in_use_before = _device_in_use(self.device)
            self._reserved_before = torch.cuda.memory_reserved(self.device)
            cc = config.cache_config
            if cc.kv_cache_memory_bytes is None and cc.num_gpu_blocks_override is None:
                total = torch.cuda.mem_get_info(self.device)[1]  # fail before loading weights
                check_share_is_free(total, self._in_use_before, cc.gpu_memory_utilization)
        # Tensor parallelism: the process group is up (engine/tp_executor.py); this rank loads
        # its shards only and its attention and KV cache hold its heads only.
        pc = config.parallel_config
        self.tp = TensorParallel.from_group() if pc.tensor_parallel_size > 1 else None
        plan = ShardPlan(self.tp, mc.num_heads, mc.num_kv_heads) if self.tp else None
        logger.info("loading weights of %s", mc.model)
        with self._timed("weights"):
            self.model = load_model(mc, self.device, plan)
        self.load_seconds = self.start_seconds["weights"]
        logger.info("loaded weights in %.1f s", self.load_seconds)
        self.vocab_size = int(mc.hf_config.vocab_size)
        layers = layer_attention(self.model, mc.num_layers)
        spec = mc.attention_spec(self.block_size, self.device, layers)
        if plan is not None:
            heads, kv_heads = plan.local_heads
            spec = dataclasses.replace(spec, num_heads=heads, num_kv_heads=kv_heads)
        self.backend: AttentionBackend = create_backend(config.attention_backend, spec)
        self.kv_caches: list[torch.Tensor] = []
        self.sampler = Sampler()
        # What is compiled and run: the model's forward, or (eagle3) the forward that also
        # returns the hidden states entering the layers the head reads (models/aux_hidden.py).
        self.forward_module: torch.nn.Module = self.model
        self.forward_fn: Callable[[torch.Tensor, torch.Tensor], Any] = self.model.forward
        self.compiled: CompiledModel | None = None
        self.graphs: CudaGraphRunner | None = None
        # Speculative decoding with a draft model or EAGLE-3 head: its own runner (weights,
        # compiled forward, CUDA graphs, a KV cache of as many blocks as this one's, addressed by
        # the same block ids); engine/draft_proposer.py and engine/eagle_proposer.py run it.
        self.draft: ModelRunner | None = None
        # eagle3: per KV slot, the head's combined input from this model's hidden states at that
        # token (written by every step, read by the head when it catches up).
        self.hidden_cache: torch.Tensor | None = None
        self.aux_hidden: AuxHiddenStates | None = None
        spec = config.speculative_config
        if spec is not None and spec.draft_model_config is not None:
            logger.info("loading the draft model %s", spec.draft_model_config.model)
            draft_config = dataclasses.replace(
                config, model_config=spec.draft_model_config, speculative_config=None
            )
            self.draft = ModelRunner(draft_config, self.profiler, is_draft=True)
            self.start_seconds["weights"] += self.draft.start_seconds["weights"]
            self.load_seconds = self.start_seconds["weights"]
            if spec.method == "eagle3":
                self._attach_eagle3(spec.eagle_aux_hidden_state_layer_ids)

    def _attach_eagle3(self, layer_ids: tuple[int, ...]) -> None:
        """The head reads the target's embedding where its checkpoint has none, and the target's
        forward returns the inputs of `layer_ids` too (a different graph, its own compile-cache
        entry; models without a head are not touched)."""
        assert self.draft is not None
        head: Any = self.draft.model
        target: Any = self.model
        head.share_embedding(target.model.embed_tokens)
        head.set_max_tokens(self.config.scheduler_config.max_num_batched_tokens)
        self.aux_hidden = AuxHiddenStates(self.model, layer_ids)
        self.forward_module = self.aux_hidden
        self.forward_fn = self.aux_hidden

    # --- KV cache -------------------------------------------------------------------------------
    def determine_num_blocks(self) -> int:
        cc = self.config.cache_config
        per_block = self.kv_cache_bytes_per_block()
        sc = self.config.scheduler_config
        useful = sc.max_num_seqs * -(-sc.max_model_len // self.block_size)
        if cc.num_gpu_blocks_override is not None:
            num_blocks = cc.num_gpu_blocks_override
        elif cc.kv_cache_memory_bytes is not None:
            num_blocks = min(cc.kv_cache_memory_bytes // per_block, useful)
        elif self.device.type == "cuda":
            num_blocks = min(self._profile_kv_cache_bytes() // per_block, useful)
        else:
            num_blocks = min(_DEFAULT_CPU_KV_BYTES // per_block, useful)
        if self.tp is not None:  # every rank's block tables index the same blocks
            found = torch.tensor([num_blocks], dtype=torch.int64, device=self.device)
            torch.distributed.all_reduce(found, torch.distributed.ReduceOp.MIN, self.tp.group)
            num_blocks = int(found.item())
        if num_blocks * self.block_size < sc.max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks of {self.block_size} tokens, fewer than "
                f"max_model_len={sc.max_model_len}; lower max_model_len or give the cache more "
                "memory (kv_cache_memory_bytes / gpu_memory_utilization)"
            )
        return int(num_blocks)

    def kv_cache_bytes_per_block(self) -> int:
        """Bytes of one block id: this model's KV, plus the draft model's (its cache has as many
        blocks, so the budget is split in proportion to the two models' per-token KV)."""
        per_block = self.backend.kv_cache_bytes_per_block(self.config.model_config.num_layers)
        if self.draft is not None:
            per_block += self.draft.kv_cache_bytes_per_block()
        if self.aux_hidden is not None:
            per_block += self.block_size * self._hidden_cache_row().nbytes
        return per_block

    def _hidden_cache_row(self) -> torch.Tensor:
        assert self.draft is not None
        head: Any = self.draft.model
        weight: torch.Tensor = head.fc.weight
        return torch.empty(weight.shape[0], dtype=weight.dtype, device="meta")

    def _profile_kv_cache_bytes(self) -> int:
        m = self._profile_memory()
        utilization = self.config.cache_config.gpu_memory_utilization
        budget = kv_cache_budget(m, utilization)
        logger.info(
            "KV cache budget %.2f GiB = %.2f x %.2f GiB (gpu_memory_utilization x total) - weights "
            "%.2f - activation peak %.2f - non-torch %.2f - CUDA graphs %.2f GiB (%.2f GiB were "
            "in use before this engine started)",
            budget / _GIB,
            utilization,
            m.total / _GIB,
            m.weights / _GIB,
            m.activation_peak / _GIB,
            m.non_torch / _GIB,
            m.cuda_graphs / _GIB,
            m.in_use_before / _GIB,
        )
        return budget

    def max_sample_rows(self) -> int:
        """The most logits rows a step samples: one per request, or 1 + k per speculating one."""
        sc = self.config.scheduler_config
        spec = self.config.speculative_config
        rows = sc.max_num_seqs * (1 + (spec.num_speculative_tokens if spec else 0))
        return min(rows, max(sc.max_num_seqs, sc.max_num_batched_tokens))

    def _profile_memory(self) -> MemoryProfile:
        """Measure what this engine needs besides the KV cache, on a scratch cache. It compiles
        first (at -O1/-O2), so the profile runs the forward that will serve and sees GEMM
        merging's final weights. The largest step gives the activation peak. CUDA graphs:
        piecewise graphs hold no KV-cache address, so all of them are captured now and kept;
        full decode graphs read the cache, so the two largest are captured and dropped: later
        graphs reuse the largest one's pool memory (captured largest first, cuda_graphs.py) and
        each adds what the second added (at least its output, which stays allocated) and 2 MiB.
        Not seen: kernels first loaded later, the attention backends' capture buffers that grow
        with the pool (block tables as wide as it: 4 bytes a block a request slot, measured here
        at the scratch pool's width), and memory other processes take or free meanwhile."""
        sc = self.config.scheduler_config
        dev = self.device
        num_tokens = min(sc.max_num_batched_tokens, sc.max_model_len)
        self.initialize_kv_cache(-(-num_tokens // self.block_size))  # scratch
        self._compile_forward()
        if self.draft is not None:
            self.draft._compile_forward()

        def in_use() -> int:  # by this engine, torch or not
            return _device_in_use(dev) - self._in_use_before

        in_use()  # empties the cache, so the peak below is what the step adds
        reserved, allocated = torch.cuda.memory_reserved(dev), torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        with self._timed("memory_profile"):
            self.dummy_run(num_tokens, num_reqs=1, sample_rows=self.max_sample_rows())
            torch.cuda.synchronize(dev)
        activation_peak = max(
            torch.cuda.max_memory_reserved(dev) - reserved,
            torch.cuda.max_memory_allocated(dev) - allocated,
        )

        def footprint() -> tuple[int, int]:
            used = in_use()
            return used, used - torch.cuda.memory_reserved(dev) + torch.cuda.memory_allocated(dev)

        before, reserved = in_use(), torch.cuda.memory_reserved(dev)
        graphs = 0
        with self._timed("cudagraphs"):  # the piecewise graphs are captured here, and kept
            for runner in (self, self.draft):
                if runner is not None and runner.graphs is not None:
                    graphs += runner.graphs.measure_memory(footprint)
        held = in_use() - before  # what the graphs (piecewise kept, decode dropped) hold now
        held_torch = torch.cuda.memory_reserved(dev) - reserved
        self.kv_caches = []
        self.hidden_cache = None
        if self.draft is not None:
            self.draft.kv_caches = []
        used = in_use()
        torch_used = torch.cuda.memory_reserved(dev) - self._reserved_before
        return MemoryProfile(
            total=torch.cuda.mem_get_info(dev)[1],
            in_use_before=self._in_use_before,
            weights=torch_used - held_torch,
            activation_peak=activation_peak,
            non_torch=max(0, used - torch_used - (held - held_torch)),
            cuda_graphs=max(graphs, held),
        )

    @contextlib.contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.start_seconds[stage] = self.start_seconds.get(stage, 0.0) + elapsed

    def initialize_kv_cache(self, num_blocks: int) -> None:
        with self._timed("kv_cache"):
            self.kv_caches = self.backend.allocate_kv_caches(
                num_blocks, self.config.model_config.num_layers
            )
        if self.draft is not None:
            self.draft.initialize_kv_cache(num_blocks)
        if self.aux_hidden is not None:
            row = self._hidden_cache_row()
            self.hidden_cache = torch.zeros(
                num_blocks * self.block_size, row.shape[0], dtype=row.dtype, device=self.device
            )

    def compile(self) -> None:
        """At -O1 and above: compile the forward now (not on the first request); at -O2 capture
        the CUDA graphs, with the KV cache in place. CUDA KV sizing may have done part of it."""
        self._compile_forward()
        if self.graphs is not None:
            with self._timed("cudagraphs"):
                self.graphs.capture()
        if self.draft is not None:
            self.draft.compile()
            for stage in ("compile", "cudagraphs"):
                if stage in self.draft.start_seconds:
                    self.start_seconds[stage] = (
                        self.start_seconds.get(stage, 0.0) + self.draft.start_seconds[stage]
                    )

    def _compile_forward(self) -> None:
        if self.compiled is not None or self.config.compilation_config.level < 1:
            return
        with self._timed("compile"):
            self.compiled = CompiledModel(self.forward_module, self.config, self.backend.name)
            self.forward_fn = self.compiled
            self.dummy_run(num_tokens=16, num_reqs=2)
        if self.device.type == "cuda":  # hand back the weights GEMM merging copied and freed
            torch.cuda.empty_cache()
        if self.compiled.graph_pool is not None:
            spec = self.config.speculative_config  # None for a draft model's own runner
            self.graphs = CudaGraphRunner(
                self,
                self.compiled,
                self.compiled.graph_pool,
                self.config.compilation_config,
                self.config.scheduler_config,
                verify_len=1 + (spec.num_speculative_tokens if spec else 0),
                max_verify_reqs=spec.disable_by_batch_size if spec else None,
            )

    # --- one step -------------------------------------------------------------------------------
    def prepare_inputs(
        self,
        scheduled: list[ScheduledRequest],
        block_ids: list[list[int]],
        previous: StepHandle | None = None,
        planned: tuple[HostInputs, np.ndarray] | None = None,
    ) -> StepInputs:
        """Tensors for one step. Tokens the host does not know yet (sampled by `previous`, still
        in flight) are taken from `previous`'s device output. A request with drafts feeds them
        after its newest token and gets logits at each of them (1 + len(drafts) rows).
        `planned`: the step's `host_inputs`, made earlier (before `previous` was sampled)."""
        host, logits_indices = planned or self.host_inputs(scheduled, block_ids, previous)
        ids_t, pos_t, attn = self.device_inputs(host, previous)
        return StepInputs(
            input_ids=ids_t,
            positions=pos_t,
            attn=attn,
            logits_indices=self._to_device(logits_indices),
            sampling_requests=[s.request for s in scheduled if s.samples],
            sampling_drafts=[s.draft_token_ids for s in scheduled if s.samples],
        )

    def host_inputs(
        self,
        scheduled: list[ScheduledRequest],
        block_ids: list[list[int]],
        previous: StepHandle | LaunchedStep | None = None,
    ) -> tuple[HostInputs, np.ndarray]:
        """A step's host arrays, and the rows of its tokens that get logits. `previous`, the
        step in flight, only gives the rows its sampling writes (it may not be sampled yet)."""
        q_lens = np.array([s.num_tokens for s in scheduled], dtype=np.int64)
        starts = np.array([s.start for s in scheduled], dtype=np.int64)
        cu = np.cumsum(q_lens)
        pieces, pending_dst, pending_src = [], [], []
        for i, s in enumerate(scheduled):
            num_known = s.num_tokens - len(s.draft_token_ids)
            known = s.request.token_ids(s.start, s.start + num_known)
            if len(known) < num_known:  # the last one is being sampled by `previous`
                assert previous is not None and len(known) == num_known - 1
                assert not s.draft_token_ids
                pending_dst.append(int(cu[i]) - 1)
                pending_src.append(previous.row[s.request.request_id])
                known = known + [0]
            pieces.append(np.asarray(known + s.draft_token_ids, dtype=np.int64))
        width = max(len(b) for b in block_ids)
        block_table = np.zeros((len(scheduled), width), dtype=np.int32)
        for i, ids in enumerate(block_ids):
            block_table[i, : len(ids)] = ids
        samples = np.array([s.samples for s in scheduled], dtype=bool)
        rows = np.array([1 + len(s.draft_token_ids) for s in scheduled], dtype=np.int64)[samples]
        # each sampling request's last `rows` token positions, in order
        ends = np.repeat(cu[samples], rows)
        logits_indices = (
            ends
            - np.repeat(rows, rows)
            + np.arange(int(rows.sum()))
            - np.repeat(np.cumsum(rows) - rows, rows)
        )
        host = HostInputs(
            token_ids=np.concatenate(pieces),
            q_lens=q_lens,
            seq_lens=starts + q_lens,
            block_table=block_table,
            pending_dst=pending_dst,
            pending_src=pending_src,
        )
        return host, logits_indices

    def device_inputs(
        self, host: HostInputs, previous: StepHandle | None
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionInputs]:
        """Token ids, positions and attention inputs on the device, with the tokens `previous`
        is sampling spliced in."""
        ids_t, pos_t, attn = self._device_inputs(
            host.token_ids, host.q_lens, host.seq_lens, host.block_table
        )
        if host.pending_dst:
            dst = self._to_device(np.asarray(host.pending_dst))
            ids_t[dst] = self.pending_tokens(host, previous)
        return ids_t, pos_t, attn

    def pending_tokens(self, host: HostInputs, previous: StepHandle | None) -> torch.Tensor:
        """The ids `previous` sampled for `host.pending_dst`, on the device."""
        assert previous is not None and previous.device_tokens is not None
        return previous.device_tokens[self._to_device(np.asarray(host.pending_src))]

    def check_health(self) -> None:
        """Raise if this runner can no longer run steps (a tensor-parallel worker died)."""

    def shutdown(self) -> None:
        """Release what outlives the object (tensor-parallel workers); nothing here."""

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(self.device, non_blocking=True)

    def _device_inputs(
        self,
        input_ids: np.ndarray,
        q_lens: np.ndarray,
        seq_lens: np.ndarray,
        block_table: np.ndarray,
        write_kv: bool = True,
        padding: tuple[int | None, int | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionInputs]:
        """Device tensors for one step, padded to the CUDA graph the step will run as
        (`CudaGraphRunner.padding`, unless `padding` gives the (tokens, requests)): padding
        tokens get id 0, position 0 and slot -1, so nothing is written."""
        num_tokens = len(input_ids)
        if padding is None:
            max_q = int(q_lens.max()) if len(q_lens) else 0
            padding = (
                self.graphs.padding(num_tokens, len(q_lens), max_q) if self.graphs else (None, None)
            )
        padded, padded_reqs = padding
        attn, positions = AttentionInputs.from_batch(
            q_lens,
            seq_lens,
            block_table,
            self.block_size,
            self.device,
            num_padded_tokens=padded,
            num_padded_reqs=padded_reqs,
            write_kv=write_kv,
        )
        extra = max(0, (padded or 0) - num_tokens)
        if extra:
            input_ids = np.concatenate([input_ids, np.zeros(extra, dtype=np.int64)])
            positions = np.concatenate([positions, np.zeros(extra, dtype=np.int64)])
        return self._to_device(input_ids), self._to_device(positions), attn

    @torch.inference_mode()
    def execute_async(
        self,
        sched: SchedulerOutput,
        block_ids: list[list[int]],
        previous: StepHandle | None = None,
    ) -> StepHandle:
        """Launch a step; returns before the device finishes it."""
        return self.sample(self.launch(sched, block_ids, previous))

    @torch.inference_mode()
    def launch(
        self,
        sched: SchedulerOutput,
        block_ids: list[list[int]],
        previous: StepHandle | None = None,
        planned: tuple[HostInputs, np.ndarray] | None = None,
    ) -> LaunchedStep:
        """Launch a step's forward and logits (and build its sampling batch); `sample` launches
        the sampling. Between the two the host may fill the grammar bitmask while the device
        runs the forward. `planned`: the step's `host_inputs`, if made already."""
        stage = self.profiler.stage
        with stage("prepare inputs"):
            inputs = self.prepare_inputs(sched.scheduled, block_ids, previous, planned)
        with stage("forward"):
            hidden, aux = self._run(inputs.input_ids, inputs.positions, inputs.attn)
            if aux is not None and self.hidden_cache is not None:
                # the head's input at each token, kept at the token's KV slot
                slots = inputs.attn.slot_mapping[: inputs.attn.num_tokens]
                self.hidden_cache[slots] = self.draft.model.combine(aux)  # type: ignore[union-attr,operator]
        if any(s.request.needs_prompt_logprobs for s in sched.scheduled):
            with stage("prompt logprobs"):
                self._prompt_logprobs(sched.scheduled, hidden)
        if not inputs.sampling_requests:
            return LaunchedStep([], None, None, [], [])
        drafts = inputs.sampling_drafts
        with stage("sample"):
            logits = self.compute_logits(hidden[inputs.logits_indices])
            batch = build_sampling_batch(
                inputs.sampling_requests,
                self.vocab_size,
                self.device,
                previous,
                drafts if any(drafts) else None,
            )
        num_rows = [1 + len(d) for d in drafts]
        return LaunchedStep(inputs.sampling_requests, logits, batch, num_rows, drafts)

    def _prompt_logprobs(self, scheduled: list[ScheduledRequest], hidden: torch.Tensor) -> None:
        """sampling_params.prompt_logprobs of the requests that want them, for the prompt tokens
        this step's rows predict (a request's row at position p scores prompt token p + 1),
        stored on the request. Synchronous: only the steps that carry such a prompt wait. The
        logits are the model's own (no penalties, bias or temperature: vLLM's raw logprobs),
        made PROMPT_LOGPROBS_ROWS rows at a time."""
        offset = 0
        for s in scheduled:
            request, start = s.request, s.start
            rows = 0
            if request.needs_prompt_logprobs:
                rows = max(0, min(s.num_tokens, request.num_prompt_tokens - 1 - start))
            k = request.sampling_params.prompt_logprobs or 0
            for lo in range(0, rows, PROMPT_LOGPROBS_ROWS):
                n = min(PROMPT_LOGPROBS_ROWS, rows - lo)
                first = start + 1 + lo  # the first prompt position these rows score
                logits = self.compute_logits(hidden[offset + lo : offset + lo + n])
                targets = torch.tensor(request.prompt_token_ids[first : first + n])
                top_ids, top_lps, lps, ranks = (
                    t.tolist()
                    for t in token_logprobs(logits.log_softmax(-1), targets.to(logits.device), k)
                )
                assert request.prompt_logprobs is not None
                for i in range(n):
                    request.prompt_logprobs[first + i] = (top_ids[i], top_lps[i], lps[i], ranks[i])
            offset += s.num_tokens

    @torch.inference_mode()
    def sample(self, step: LaunchedStep, bitmask: torch.Tensor | None = None) -> StepHandle:
        """Launch the sampling of a launched step. `bitmask`: the allowed-token bitmask of its
        rows (host tensor, StructuredOutputManager.bitmask; a request's draft rows included), if
        any row has a grammar."""
        if step.logits is None or step.batch is None:
            return StepHandle([], None)
        with self.profiler.stage("sample"):
            batch = step.batch
            if bitmask is not None:
                assert bitmask.shape[0] == step.logits.shape[0], "a bitmask row per logits row"
                batch.token_bitmask = bitmask.to(self.device, non_blocking=True)
            out = self.sampler(step.logits, batch)
            return self.step_handle(step.requests, out, step.num_rows)

    def run_model(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionInputs
    ) -> torch.Tensor:
        return self._run(input_ids, positions, attn)[0]

    def _run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionInputs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The forward's hidden states, and the auxiliary ones where it returns them (eagle3),
        for the step's real tokens."""
        context = self.forward_context(self.backend.build_metadata(attn))
        out: Any
        if self.graphs is not None:
            out = self.graphs.run(input_ids, positions, attn, context)
        else:
            with set_forward_context(context):
                out = self.forward_fn(input_ids, positions)
        hidden, aux = out if isinstance(out, tuple) else (out, None)
        n = attn.num_tokens
        return hidden[:n], aux[:n] if aux is not None else None

    def forward_context(self, metadata: Any) -> ForwardContext:
        return ForwardContext(self.backend, self.kv_caches, metadata)

    def dummy_inputs(
        self, num_tokens: int, num_reqs: int, num_padded_reqs: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionInputs]:
        """A synthetic batch: `num_reqs` fresh requests sharing `num_tokens` (profiling,
        compilation, graph capture), not padded further; `num_padded_reqs` marks it as a full
        graph's batch. No request is longer than max_model_len (positions past it are outside
        the RoPE table: a device-side assert at capture), so a size above it is split across
        more requests. Nothing is written to the KV cache."""
        max_len = self.config.scheduler_config.max_model_len
        num_reqs = max(1, min(max(num_reqs, -(-num_tokens // max_len)), num_tokens))
        q_lens = np.full(num_reqs, num_tokens // num_reqs, dtype=np.int64)
        q_lens[: num_tokens % num_reqs] += 1
        width = -(-int(q_lens.max()) // self.block_size)
        num_blocks = self.kv_caches[0].shape[0]
        block_table = (np.arange(num_reqs * width) % num_blocks).reshape(num_reqs, width)
        ids = np.zeros(num_tokens, dtype=np.int64)
        padding = (num_tokens, num_padded_reqs)
        return self._device_inputs(ids, q_lens, q_lens, block_table, False, padding)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's output head (eager, on the rows that sample), under the compiled
        pipeline's eager passes (e.g. oneDNN GEMMs on CPU; `CompilerPass.eager_mode`)."""
        if self.compiled is None:
            return self.model.compute_logits(hidden)
        with self.compiled.pipeline.eager():
            return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def dummy_run(self, num_tokens: int, num_reqs: int, sample_rows: int = 0) -> None:
        input_ids, positions, attn = self.dummy_inputs(num_tokens, num_reqs)
        hidden = self.run_model(input_ids, positions, attn)
        if sample_rows:
            rows = hidden[:1].expand(sample_rows, -1)
            logits = self.compute_logits(rows)
            logits.log_softmax(-1).sort(dim=-1)
