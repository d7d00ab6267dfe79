"""Typed, frozen engine configuration.

`EngineArgs` is the flat keyword surface users see (`LLM(**kwargs)`, the CLI flags generated from
its fields) and the one place defaults live; it validates itself at construction, and
`create_config()` resolves the model and splits it into the frozen configs each part of the engine
reads.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

import torch

from compiled_llm.attention_backends.base import AttentionSpec, LayerAttention
from compiled_llm.envs import Envs
from compiled_llm.generation_config import check_source as check_generation_config
from compiled_llm.generation_config import sampling_defaults
from compiled_llm.models.interface import attention_scale, head_dim
from compiled_llm.quantization import QuantizationConfig

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


@dataclass(frozen=True)
class ModelConfig:
    model: str  # the resolved local path (HF folder or .gguf file)
    hf_config: Any  # transformers.PretrainedConfig
    dtype: torch.dtype
    max_model_len: int
    tokenizer: str  # folder or .gguf file the tokenizer is read from
    seed: int
    load_format: str  # "auto": the checkpoint's weights; "dummy": random, made on device
    skip_tokenizer_init: bool  # token ids in and out only (benchmarks)
    model_impl: str  # resolved: "native" (our model class) or "transformers" (the fallback)
    trust_remote_code: bool  # a local folder's own modeling code may run (transformers)
    quantization: QuantizationConfig | None  # resolved: the user's choice or the checkpoint's
    kv_cache_dtype: torch.dtype  # resolved: `dtype`, or FP8 (E4M3)
    max_logprobs: int  # most logprobs per token a request may ask for (-1: the vocabulary)
    # SamplingParams field -> the model's recommended default (generation_config.py), as pairs
    sampling_defaults: tuple[tuple[str, Any], ...]

    @property
    def architecture(self) -> str:
        archs = getattr(self.hf_config, "architectures", None) or []
        return archs[0] if archs else ""

    @property
    def num_layers(self) -> int:
        return int(self.hf_config.num_hidden_layers)

    @property
    def num_heads(self) -> int:
        return int(self.hf_config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        return int(getattr(self.hf_config, "num_key_value_heads", None) or self.num_heads)

    @property
    def head_dim(self) -> int:
        return head_dim(self.hf_config)

    def attention_spec(
        self,
        block_size: int,
        device: torch.device,
        layers: tuple[LayerAttention, ...] = (),
    ) -> AttentionSpec:
        """What the attention backend is built for: this model's heads, dtype and device, and
        its layers' attributes (`models.attention.layer_attention` of the loaded model)."""
        return AttentionSpec(
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            block_size=block_size,
            dtype=self.dtype,
            device=device,
            scale=attention_scale(self.hf_config),
            layers=layers,
            kv_cache_dtype=self.kv_cache_dtype,
        )


# The frozen configs below have no defaults: EngineArgs holds the one default of every value and
# validates what needs no model; create_config() fills them in.


@dataclass(frozen=True)
class CacheConfig:
    block_size: int
    gpu_memory_utilization: float
    kv_cache_memory_bytes: int | None  # explicit budget (None: sized from memory)
    num_gpu_blocks_override: int | None
    enable_prefix_caching: bool


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool
    async_scheduling: bool

    def __post_init__(self) -> None:
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                "max_num_batched_tokens must be >= max_model_len when chunked prefill is off"
            )


@dataclass(frozen=True)
class CompilationConfig:
    """How the model forward is captured and compiled (see compiled_llm/compilation)."""

    level: int  # 0 eager, 1 compile, 2 compile + CUDA graphs
    passes: tuple[str, ...]  # "+name" / "-name" edits of the default pipeline
    cudagraph_capture_sizes: tuple[int, ...] | None
    compile_cache_dir: str | None
    compile_dump_dir: str | None


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor parallelism (docs/tensor_parallel.md): the number of ranks, which one this
    process is, and what runs ranks 1..N-1 ("mp": processes on this host, "ray": Ray actors).
    The engine core runs rank 0; `engine/tp_executor.py` gives each worker a copy of the config
    with its own rank (and, on CUDA, its own device)."""

    tensor_parallel_size: int
    rank: int
    distributed_executor_backend: str

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(
                f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}"
            )
        if not 0 <= self.rank < self.tensor_parallel_size:
            raise ValueError(f"rank={self.rank} must be in 0..{self.tensor_parallel_size - 1}")


_MATCHER_PLACES = ("auto", "process", "inline")


@dataclass(frozen=True)
class StructuredOutputsConfig:
    """Where the grammar matchers (docs/structured_output.md) accept sampled tokens and fill the
    next bitmask: "process", a process of their own beside the engine core, or "inline", the
    engine core's step loop ("auto" is resolved before this is built)."""

    matchers: str

    def __post_init__(self) -> None:
        if self.matchers not in _MATCHER_PLACES[1:]:
            raise ValueError(
                f"structured_outputs_matchers={self.matchers!r} is not one of {_MATCHER_PLACES}"
            )
        if self.matchers == "process" and not hasattr(os, "memfd_create"):
            raise ValueError(
                "structured_outputs_matchers='process' needs Linux (the bitmask is shared through "
                "os.memfd_create); use 'inline'"
            )


@dataclass(frozen=True)
class ObservabilityConfig:
    profile_dir: str | None
    nvtx: bool


SPECULATIVE_METHODS = (
    "ngram",
    "draft_model",
    "eagle3",
)  # what compiled_llm/spec_decode proposes with
# Methods whose proposer is a second model read from `speculative_config.model`.
_MODEL_METHODS = ("draft_model", "eagle3")
# vLLM's other methods: named so that asking for one says "not supported yet", not "unknown".
_SPECULATIVE_METHODS_LATER = ("eagle", "medusa", "mtp", "suffix")
# Adaptive k (docs/speculative_decoding.md, "Adaptivity"): the price of one draft token in a
# verification step, in decode steps without drafts, per method; 0 turns adaptive k off. Fitted
# to the H200 runs of 2026-12-03 (8B target, batch 1 and 8): a verification step costs ~1.22 decode
# steps whatever k (the synchronous step and the acceptance), plus ~0.01 per n-gram draft, ~0.45
# per draft of a 1B draft model (its own decode step); EAGLE-3's head (one layer and a head)
# in between.
DEFAULT_DRAFT_TOKEN_COSTS = {"ngram": 0.02, "draft_model": 0.5, "eagle3": 0.1}
# speculative_config keys and their defaults where the user leaves one out (None: required, or
# taken from another key; see speculative_config_from).
SPECULATIVE_DEFAULTS: dict[str, Any] = {
    "method": None,
    "model": None,
    "num_speculative_tokens": None,
    "prompt_lookup_max": 5,
    "prompt_lookup_min": None,  # 2, or prompt_lookup_max if that is lower
    "disable_by_batch_size": 32,
    "draft_tensor_parallel_size": None,  # draft_model, eagle3: 1 (the draft runs unsharded)
    # "rejection_sampling" for draft_model and eagle3, "coupled" for ngram
    "acceptance_method": None,
    "draft_token_cost": None,  # ours (vLLM has no adaptive k): DEFAULT_DRAFT_TOKEN_COSTS
}
# How sampled drafts are accepted (docs/speculative_decoding.md, "Verification"): the textbook
# rule, or the draft sampling with the target's own noise and kept iff the target draws it too.
ACCEPTANCE_METHODS = ("rejection_sampling", "coupled")
# vLLM V0's spellings: its name of the textbook rule is taken; its other sampler is not built.
_ACCEPTANCE_ALIASES = {"rejection_sampler": "rejection_sampling"}
_ACCEPTANCE_METHODS_LATER = ("typical_acceptance_sampler",)


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (docs/speculative_decoding.md): a proposer guesses the next
    `num_speculative_tokens` tokens of a decoding request and the target model checks them all
    in its ordinary step. Built from the user's `speculative_config` dict (vLLM's keys) by
    `speculative_config_from`, which holds the defaults and validates."""

    method: str  # "ngram" (compiled_llm/spec_decode's registry), "draft_model" or "eagle3"
    num_speculative_tokens: int  # k: most draft tokens checked per request and step
    model: str | None  # draft_model, eagle3: the draft's path as given (None for ngram)
    # draft_model, eagle3: the draft resolved by EngineArgs.create_config (None before, and for
    # ngram)
    draft_model_config: ModelConfig | None
    prompt_lookup_min: int  # ngram: shortest suffix of the context looked up
    prompt_lookup_max: int  # ngram: longest suffix looked up (tried first)
    # No request speculates in a step that starts with more running requests than this (None:
    # any number). Verifying k tokens per request turns a memory-bound decode step into a
    # compute-bound one once the batch is large.
    disable_by_batch_size: int | None
    # eagle3: the target layers whose *input* (the residual stream entering layer i; vLLM's
    # indexing) is handed to the draft head, resolved by EngineArgs.create_config from the head's
    # config or EAGLE-3's default (2, L // 2, L - 3); () before, and for other methods.
    eagle_aux_hidden_state_layer_ids: tuple[int, ...]
    # Adaptive k (ours; vLLM has none): each request proposes the number of drafts, 1 to
    # num_speculative_tokens, that maximizes its expected tokens per step cost 1 + c * k, given its
    # recent acceptance (spec_decode/state.py); c is this, 0 always proposes num_speculative_tokens.
    draft_token_cost: float
    # How a sampling request's drafts are accepted: "rejection_sampling" (accept draft x with
    # probability min(1, p(x)/q(x)), resample a rejection from max(0, p - q); the most drafts
    # accepted) or "coupled" (the draft samples with the noise the target verifies with and is
    # kept iff the target draws it too: seeded output identical to no speculation). ngram's drafts
    # have no distribution (q one-hot, both rules accept with p(x)): it always runs the coupled
    # check. Greedy requests accept on argmax match under either.
    acceptance_method: str = "rejection_sampling"


def speculative_config_from(value: Any) -> SpeculativeConfig | None:
    """The typed config of `speculative_config` (a dict with vLLM's keys, a SpeculativeConfig,
    or None: off). ValueError naming the key for anything wrong or not supported yet."""
    if value is None or isinstance(value, SpeculativeConfig):
        return value
    if not isinstance(value, dict):
        raise ValueError(
            f"speculative_config must be a dict (JSON object), got {type(value).__name__}"
        )
    unknown = sorted(set(value) - set(SPECULATIVE_DEFAULTS))
    if unknown:
        raise ValueError(
            f"speculative_config has unknown key(s) {', '.join(map(repr, unknown))}; known: "
            + ", ".join(SPECULATIVE_DEFAULTS)
        )
    d = {**SPECULATIVE_DEFAULTS, **value}
    method, model = d["method"], d["model"]
    if method is None and model in ("ngram", "[ngram]"):
        method, model = "ngram", None  # vLLM's older spelling
    if method is None:
        method = "draft_model" if model is not None else None
    if method is None:
        raise ValueError(
            f"speculative_config.method is required: one of {', '.join(SPECULATIVE_METHODS)}"
        )
    if method in _SPECULATIVE_METHODS_LATER:
        raise ValueError(
            f"speculative_config.method={method!r} is not supported yet; supported: "
            + ", ".join(SPECULATIVE_METHODS)
        )
    if method not in SPECULATIVE_METHODS:
        raise ValueError(
            f"speculative_config.method must be one of {', '.join(SPECULATIVE_METHODS)}, "
            f"got {method!r}"
        )
    if method in _MODEL_METHODS:
        if not isinstance(model, str) or not model:
            raise ValueError(
                f"speculative_config.model is required for method {method!r}: the draft's "
                f"local folder{' or .gguf file' if method == 'draft_model' else ''}, got {model!r}"
            )
        if d["draft_tensor_parallel_size"] not in (None, 1):
            raise ValueError(
                "speculative_config.draft_tensor_parallel_size must be 1 (the draft runs "
                f"unsharded), got {d['draft_tensor_parallel_size']!r}"
            )
    else:
        if model is not None:
            raise ValueError(
                "speculative_config.model is for draft models and EAGLE-3 heads; method "
                f"{method!r} takes none"
            )
        if d["draft_tensor_parallel_size"] is not None:
            raise ValueError(
                "speculative_config.draft_tensor_parallel_size is for draft models and EAGLE-3 "
                f"heads; method {method!r} takes none"
            )

    def integer(key: str, low: int, optional: bool = False) -> None:
        v = d[key]
        if v is None and optional:
            return
        if v is None:
            raise ValueError(f"speculative_config.{key} is required")
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ValueError(f"speculative_config.{key} must be an integer >= {low}, got {v!r}")

    integer("num_speculative_tokens", 1)
    integer("prompt_lookup_max", 1)
    if d["prompt_lookup_min"] is None:  # 2, or prompt_lookup_max when that is lower
        d["prompt_lookup_min"] = min(2, d["prompt_lookup_max"])
    integer("prompt_lookup_min", 1)
    if d["prompt_lookup_min"] > d["prompt_lookup_max"]:
        raise ValueError(
            f"speculative_config.prompt_lookup_min={d['prompt_lookup_min']} must be <= "
            f"prompt_lookup_max={d['prompt_lookup_max']}"
        )
    integer("disable_by_batch_size", 1, optional=True)
    acceptance = d["acceptance_method"]
    if acceptance is None:
        acceptance = "coupled" if method == "ngram" else "rejection_sampling"
    if isinstance(acceptance, str):
        acceptance = _ACCEPTANCE_ALIASES.get(acceptance, acceptance)
    if isinstance(acceptance, str) and acceptance in _ACCEPTANCE_METHODS_LATER:
        raise ValueError(
            f"speculative_config.acceptance_method={acceptance!r} is not supported yet; "
            "supported: " + ", ".join(ACCEPTANCE_METHODS)
        )
    if not isinstance(acceptance, str) or acceptance not in ACCEPTANCE_METHODS:
        raise ValueError(
            "speculative_config.acceptance_method must be one of "
            f"{', '.join(ACCEPTANCE_METHODS)}, got {acceptance!r}"
        )
    cost = d["draft_token_cost"]
    if cost is None:
        cost = DEFAULT_DRAFT_TOKEN_COSTS[method]
    if (
        not isinstance(cost, (int, float))
        or isinstance(cost, bool)
        or not math.isfinite(cost)
        or cost < 0
    ):
        raise ValueError(
            "speculative_config.draft_token_cost must be a finite number >= 0 (0: adaptive k "
            f"off), got {cost!r}"
        )
    return SpeculativeConfig(
        method=method,
        num_speculative_tokens=d["num_speculative_tokens"],
        model=model,
        draft_model_config=None,
        prompt_lookup_min=d["prompt_lookup_min"],
        prompt_lookup_max=d["prompt_lookup_max"],
        disable_by_batch_size=d["disable_by_batch_size"],
        eagle_aux_hidden_state_layer_ids=(),
        acceptance_method=acceptance,
        draft_token_cost=float(cost),
    )


@dataclass(frozen=True)
class EngineConfig:
    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    compilation_config: CompilationConfig
    observability_config: ObservabilityConfig
    device: torch.device
    attention_backend: str
    speculative_config: SpeculativeConfig | None  # None: no speculative decoding
    parallel_config: ParallelConfig
    structured_outputs_config: StructuredOutputsConfig


_LOAD_FORMATS = ("auto", "dummy")
# vLLM's names; FP8 is E4M3 with a per-tensor scale of 1 (attention_backends/base.py).
_KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}
_MODEL_IMPLS = ("auto", "native", "transformers")
_EXECUTOR_BACKENDS = ("mp", "ray")


def _arg(default: Any, help: str, **cli: Any) -> Any:
    """An EngineArgs field with its one default and its help text; `cli` holds what the generated
    flag needs beyond them (`flags`, `choices`, `metavar`). Help of a field whose default is None
    or empty says what that default means; the CLI shows every other default itself."""
    return field(default=default, metadata={"help": help, **cli})


def require_ray() -> Any:
    """The `ray` module (distributed_executor_backend="ray"), or a ValueError saying how to
    install it."""
    try:
        import ray
    except ImportError as e:
        raise ValueError(
            f"distributed_executor_backend='ray' needs Ray, which is not installed ({e}); "
            "install it with: pip install 'compiled-llm[ray]'"
        ) from None
    return ray


def quantization_choices() -> tuple[str, ...]:
    from compiled_llm.quantization import quantization_methods

    return quantization_methods()


def attention_backend_choices() -> tuple[str, ...]:
    from compiled_llm.attention_backends.registry import available_backends

    return ("auto", *available_backends())


@dataclass
class EngineArgs:
    """Keyword arguments accepted by `LLM(...)` and the engine's command-line flags (one flag per
    field, generated in compiled_llm/cli.py), named as in vLLM where vLLM has them. Every value
    that needs no model is validated at construction, before anything is loaded.

    Not a field: vLLM's `splitting_ops`. The graph is split at the KV write and attention ops so
    the pieces between layers are identical and CUDA graphs hold no KV-cache address; any other
    split would compile each layer apart and capture the cache and attention metadata of one
    step into the piecewise graphs."""

    model: str | None = _arg(
        None,
        "HF folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)",
        metavar="PATH",
    )
    tokenizer: str | None = _arg(
        None,
        "folder or .gguf file to read the tokenizer from (default: the model's)",
        metavar="PATH",
    )
    skip_tokenizer_init: bool = _arg(False, "no tokenizer: prompts and outputs are token ids")
    load_format: str = _arg(
        "auto",
        "auto: the checkpoint's weights; dummy: random weights made on the device (benchmarks)",
        choices=_LOAD_FORMATS,
    )
    model_impl: str = _arg(
        "auto",
        "auto: our native model class where we have one for the architecture, else the "
        "transformers fallback (docs/models.md); native: ours only; transformers: the fallback "
        "even where a native class exists",
        choices=_MODEL_IMPLS,
    )
    trust_remote_code: bool = _arg(
        False,
        "let a local model folder's own modeling code (config.json's auto_map) run through "
        "transformers; without it such a model is refused",
    )
    dtype: str = _arg(
        "auto",
        "auto: float32 on CPU, the checkpoint's bfloat16 or float16 on CUDA",
        choices=("auto", *_DTYPES),
    )
    quantization: str | None = _arg(
        None,
        "fp8: linear weights quantized to FP8 (E4M3, a scale per output channel) at load and "
        "activations per token at run time; the output head stays in full precision (default: "
        "none, or what a pre-quantized checkpoint's quantization_config declares; "
        "docs/quantization.md)",
        choices=quantization_choices,
    )
    seed: int = _arg(
        0,
        "engine seed: draws the sampling seed of every request that brings none (a request's own "
        "seed is SamplingParams.seed, generate's --sampling-seed) and seeds --load-format dummy "
        "weights; the same engine seed and requests give the same outputs",
    )
    max_model_len: int | None = _arg(
        None, "longest prompt + output, in tokens (default: the model's max_position_embeddings)"
    )
    max_logprobs: int = _arg(
        20,
        "most logprobs a request may ask for per token (SamplingParams.logprobs and "
        "prompt_logprobs); -1: the whole vocabulary",
    )
    generation_config: str = _arg(
        "auto",
        "where requests' sampling defaults come from (vLLM's): auto: the model's "
        "generation_config.json (temperature, top_p, top_k, min_p, repetition_penalty, "
        "max_new_tokens), for what a request leaves unset; vllm: the library's defaults; a "
        "folder: its generation_config.json",
        metavar="auto|vllm|PATH",
    )
    override_generation_config: dict[str, Any] | None = _arg(
        None,
        "JSON object of generation-config values that replace the model's, e.g. "
        '{"temperature": 0.5} (vLLM\'s; default: none)',
        metavar="JSON",
    )
    block_size: int = _arg(16, "tokens per KV-cache block (a power of two)")
    kv_cache_dtype: str = _arg(
        "auto",
        "auto: the model's dtype; fp8 (or fp8_e4m3): keys and values in FP8 E4M3 (saturated at "
        "+-448, per-tensor scale 1), half of bf16's bytes, so the cache holds twice the tokens "
        "(docs/quantization.md)",
        choices=tuple(_KV_CACHE_DTYPES),
    )
    gpu_memory_utilization: float = _arg(
        0.9,
        "share of the GPU's memory this engine may use: weights, activations and CUDA graphs, "
        "and the KV cache gets the rest",
    )
    kv_cache_memory_bytes: int | None = _arg(
        None,
        "KV-cache size in bytes (default: what --gpu-memory-utilization leaves on CUDA, "
        "2 GiB on CPU)",
    )
    num_gpu_blocks_override: int | None = _arg(
        None, "exactly this many KV-cache blocks (default: sized from memory)"
    )
    enable_prefix_caching: bool = _arg(True, "reuse the KV cache of prompt prefixes seen before")
    max_num_seqs: int | None = _arg(
        None, "most requests in one step (default: 512 on a GPU of 70 GiB or more, else 256)"
    )
    max_num_batched_tokens: int | None = _arg(
        None, "most tokens in one step (default: the larger of 8192 and --max-num-seqs)"
    )
    enable_chunked_prefill: bool = _arg(
        True, "split long prompts over several steps, beside running decodes"
    )
    async_scheduling: bool = _arg(True, "schedule step N+1 while step N runs on the device")
    structured_outputs_matchers: str = _arg(
        "auto",
        "where structured outputs' grammar matchers accept tokens and fill the next token "
        "bitmask: process (a process of their own, beside the step loop), inline (the engine "
        "core's step loop); auto: process on CUDA (Linux), inline otherwise "
        "(docs/structured_output.md)",
        choices=_MATCHER_PLACES,
    )
    device: str = _arg(
        "auto",
        "auto (cuda when available, else cpu), cpu, cuda or cuda:N (with tensor parallelism, "
        "rank r runs on cuda:N+r)",
    )
    tensor_parallel_size: int = _arg(
        1,
        "shard the model over this many ranks, one process and one GPU each (NCCL; gloo on "
        "CPU): attention heads and MLP/expert projections split, the rest replicated; rank 0 "
        "runs in the engine core, ranks 1.. in worker processes (docs/tensor_parallel.md)",
        flags=("-tp", "--tensor-parallel-size"),
    )
    distributed_executor_backend: str = _arg(
        "mp",
        "what runs tensor-parallel ranks 1..N-1: mp: worker processes on this host; ray: Ray "
        "actors placed by a placement group (one bundle per rank) on the Ray cluster that is "
        "running (RAY_ADDRESS, `ray start`) or a local one, across nodes (pip install "
        "compiled-llm[ray]; docs/tensor_parallel.md)",
        choices=_EXECUTOR_BACKENDS,
    )
    attention_backend: str = _arg(
        "auto",
        "paged-attention backend; auto: triton on CUDA (flashinfer where triton refuses the "
        "model's layers), torch on CPU",
        choices=attention_backend_choices,
    )
    compilation_level: int | None = _arg(
        None,
        "0: eager; 1: torch.compile with our passes; 2: also CUDA graphs (default: 2 on CUDA, 1 "
        "on CPU with a C++ compiler, else 0)",
        flags=("-O", "--compilation-level"),
        choices=(0, 1, 2),
    )
    enforce_eager: bool = _arg(False, "run eagerly, as -O0 (wins over -O)")
    passes: list[str] | tuple[str, ...] = _arg(
        (),
        "comma-separated edits of the default compiler-pass pipeline: +name adds a pass, -name "
        "removes one, +pkg.module:Class adds your own (importable from the current folder); "
        "`compiled-llm passes list` names them (default: no edits)",
        metavar="EDITS",
    )
    cudagraph_capture_sizes: list[int] | tuple[int, ...] | None = _arg(
        None,
        "comma-separated batch sizes to capture CUDA graphs for at -O2 (default: powers of two to "
        "256, then steps of 64 to 512, for piecewise graphs; 1, 2, 4, then steps of 8 to 256 and "
        "of 16 to 512, up to --max-num-seqs, for full decode graphs)",
        metavar="SIZES",
    )
    compile_cache_dir: str | None = _arg(
        None,
        "where compiled graphs are kept for later starts (default: compile/ under "
        "$COMPILED_LLM_CACHE_DIR, ~/.cache/compiled_llm)",
        metavar="DIR",
    )
    compile_dump_dir: str | None = _arg(
        None, "write every pass's graph before and after it here (default: no dumps)", metavar="DIR"
    )
    profile_dir: str | None = _arg(
        None,
        "torch-profiler traces go here: generate profiles its whole run, serve answers "
        "/start_profile and /stop_profile (default: no profiling)",
        metavar="DIR",
    )
    nvtx: bool = _arg(False, "NVTX ranges around steps and their stages, for Nsight Systems")
    speculative_config: dict[str, Any] | None = _arg(
        None,
        "speculative decoding, as a JSON object with vLLM's keys (docs/speculative_decoding.md): "
        '{"method": "ngram", "num_speculative_tokens": K} proposes up to K tokens a step by '
        "looking the context's last prompt_lookup_max (default 5) down to prompt_lookup_min "
        "(default 2) tokens up earlier in the context; "
        '{"method": "draft_model", "model": PATH, "num_speculative_tokens": K} drafts with a '
        "smaller model of the same vocabulary; "
        '{"method": "eagle3", "model": PATH, "num_speculative_tokens": K} drafts with an EAGLE-3 '
        "head fed the target's hidden states; "
        "disable_by_batch_size (default 32) turns it off in steps with more running requests "
        "(default: off)",
        metavar="JSON",
    )

    def __post_init__(self) -> None:
        def require(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"{name} {what}, got {getattr(self, name)!r}")

        require(self.load_format in _LOAD_FORMATS, "load_format", "must be auto or dummy")
        require(
            self.kv_cache_dtype in _KV_CACHE_DTYPES,
            "kv_cache_dtype",
            f"must be one of {', '.join(_KV_CACHE_DTYPES)}",
        )
        require(
            self.model_impl in _MODEL_IMPLS,
            "model_impl",
            "(--model-impl) must be auto, native or transformers",
        )
        require(
            self.dtype in ("auto", *_DTYPES), "dtype", f"must be one of auto, {', '.join(_DTYPES)}"
        )
        _resolve_device(self.device)
        if self.quantization is not None:
            from compiled_llm.quantization import check_method

            check_method(self.quantization)
        if self.attention_backend != "auto":
            from compiled_llm.attention_backends.registry import get_backend_class

            get_backend_class(self.attention_backend)  # the name, and its package installed
        require(
            self.compilation_level in (None, 0, 1, 2),
            "compilation_level",
            "(-O) must be 0, 1 or 2",
        )
        require(
            self.max_model_len is None or self.max_model_len >= 1,
            "max_model_len",
            "must be at least 1",
        )
        check_generation_config(self.generation_config, self.override_generation_config)
        require(
            self.block_size > 0 and not self.block_size & (self.block_size - 1),
            "block_size",
            "must be a positive power of two",
        )
        require(
            0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization", "must be in (0, 1]"
        )
        require(
            isinstance(self.max_logprobs, int)
            and not isinstance(self.max_logprobs, bool)
            and self.max_logprobs >= -1,
            "max_logprobs",
            "must be an integer >= -1",
        )
        for name in (
            "kv_cache_memory_bytes",
            "num_gpu_blocks_override",
            "max_num_seqs",
            "max_num_batched_tokens",
        ):
            value = getattr(self, name)
            require(value is None or value >= 1, name, "must be at least 1")
        require(
            isinstance(self.tensor_parallel_size, int)
            and not isinstance(self.tensor_parallel_size, bool)
            and self.tensor_parallel_size >= 1,
            "tensor_parallel_size",
            "must be an integer >= 1",
        )
        require(
            self.distributed_executor_backend in _EXECUTOR_BACKENDS,
            "distributed_executor_backend",
            "must be mp or ray",
        )
        if self.distributed_executor_backend == "ray" and self.tensor_parallel_size > 1:
            require_ray()  # installed, before any model or weight is read
        require(
            self.structured_outputs_matchers in _MATCHER_PLACES,
            "structured_outputs_matchers",
            "must be auto, process or inline",
        )
        if self.structured_outputs_matchers == "process":
            StructuredOutputsConfig(self.structured_outputs_matchers)  # possible on this OS
        require(
            all(size >= 1 for size in self.cudagraph_capture_sizes or ()),
            "cudagraph_capture_sizes",
            "must be at least 1",
        )
        from compiled_llm.passes.registry import resolve_pipeline

        resolve_pipeline(self.passes)  # every pass name or dotted path loads
        speculative_config_from(self.speculative_config)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(unknown)}")
        return cls(**kwargs)

    def create_config(self) -> EngineConfig:
        """Resolve the model (its config.json only: no weights, no tokenizer) and build the
        frozen configs."""
        from compiled_llm.models.loader import (
            check_weights,
            load_hf_config,
            resolve_model,
            resolve_tokenizer,
        )

        device = _resolve_device(self.device)
        model_path = resolve_model(self.model)
        if self.load_format == "auto":
            check_weights(model_path)
        hf_config = load_hf_config(model_path, self.trust_remote_code)
        from compiled_llm.models.registry import (
            EAGLE3_ARCHITECTURES,
            architecture_of,
            resolve_model_impl,
        )

        if architecture_of(hf_config) in EAGLE3_ARCHITECTURES:
            raise ValueError(
                f"model {self.model!r} is an EAGLE-3 draft head, not a model to run on its own; "
                "give it as speculative_config.model with method 'eagle3'"
            )
        model_impl = resolve_model_impl(hf_config, self.model_impl)
        dtype = _resolve_dtype(self.dtype, hf_config, device)
        quantization = _resolve_quantization(self.quantization, hf_config)
        max_pos = int(getattr(hf_config, "max_position_embeddings", 0) or 8192)
        max_model_len = self.max_model_len or max_pos
        if max_model_len > max_pos:
            raise ValueError(
                f"max_model_len={max_model_len} exceeds the model's "
                f"max_position_embeddings={max_pos}"
            )
        model_config = ModelConfig(
            model=model_path,
            hf_config=hf_config,
            dtype=dtype,
            max_model_len=max_model_len,
            tokenizer=resolve_tokenizer(self.tokenizer) if self.tokenizer else model_path,
            seed=self.seed,
            load_format=self.load_format,
            skip_tokenizer_init=self.skip_tokenizer_init,
            model_impl=model_impl,
            trust_remote_code=self.trust_remote_code,
            quantization=quantization,
            kv_cache_dtype=_KV_CACHE_DTYPES[self.kv_cache_dtype] or dtype,
            max_logprobs=self.max_logprobs,
            sampling_defaults=tuple(
                sampling_defaults(
                    model_path, self.generation_config, self.override_generation_config
                ).items()
            ),
        )
        speculative_config = _resolve_speculative(
            speculative_config_from(self.speculative_config), model_config
        )
        if self.tensor_parallel_size > 1:
            _check_tensor_parallel(
                model_config,
                self.tensor_parallel_size,
                device,
                across_hosts=self.distributed_executor_backend == "ray",
            )
            if speculative_config is not None and speculative_config.method in _MODEL_METHODS:
                # The draft runs in rank 0's process only; the workers would not run it.
                raise ValueError(
                    f"speculative_config.method={speculative_config.method!r} with "
                    "tensor_parallel_size > 1 is not supported yet (n-gram speculation is)"
                )
        level = 0 if self.enforce_eager else self.compilation_level
        if level is None:
            level = _default_level(device)
        max_num_seqs = self.max_num_seqs or default_max_num_seqs(_device_memory(device))
        return EngineConfig(
            model_config=model_config,
            cache_config=CacheConfig(
                block_size=self.block_size,
                gpu_memory_utilization=self.gpu_memory_utilization,
                kv_cache_memory_bytes=self.kv_cache_memory_bytes,
                num_gpu_blocks_override=self.num_gpu_blocks_override,
                enable_prefix_caching=self.enable_prefix_caching,
            ),
            scheduler_config=SchedulerConfig(
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=self.max_num_batched_tokens or max(8192, max_num_seqs),
                max_model_len=max_model_len,
                enable_chunked_prefill=self.enable_chunked_prefill,
                async_scheduling=self.async_scheduling,
            ),
            compilation_config=CompilationConfig(
                level=level,
                passes=tuple(self.passes),
                cudagraph_capture_sizes=(
                    tuple(self.cudagraph_capture_sizes) if self.cudagraph_capture_sizes else None
                ),
                compile_cache_dir=self.compile_cache_dir,
                compile_dump_dir=self.compile_dump_dir,
            ),
            observability_config=ObservabilityConfig(profile_dir=self.profile_dir, nvtx=self.nvtx),
            device=device,
            attention_backend=self.attention_backend,
            speculative_config=speculative_config,
            parallel_config=ParallelConfig(
                tensor_parallel_size=self.tensor_parallel_size,
                rank=0,
                distributed_executor_backend=self.distributed_executor_backend,
            ),
            structured_outputs_config=StructuredOutputsConfig(
                matchers=(
                    (
                        "process"
                        if device.type == "cuda" and hasattr(os, "memfd_create")
                        else "inline"
                    )
                    if self.structured_outputs_matchers == "auto"
                    else self.structured_outputs_matchers
                )
            ),
        )


def _check_tensor_parallel(
    model_config: ModelConfig, world_size: int, device: torch.device, across_hosts: bool = False
) -> None:
    """Refuse a tensor-parallel size the model or the machine cannot run, before any process
    starts or any weight is read: the heads must split (ShardPlan), the checkpoint must be
    sliceable (safetensors, a native class) and, on CUDA, the ranks need
    one GPU each from the chosen one on (on this host; with Ray, `across_hosts`, the placement
    group finds them on the cluster instead)."""
    from compiled_llm.distributed.parallel import TensorParallel
    from compiled_llm.distributed.plan import ShardPlan
    from compiled_llm.models.loader import check_shardable

    ShardPlan(TensorParallel(0, world_size), model_config.num_heads, model_config.num_kv_heads)
    check_shardable(model_config)
    if device.type not in ("cuda", "cpu"):
        raise ValueError(
            f"tensor_parallel_size={world_size} runs on cuda or cpu, not on device={str(device)!r}"
        )
    if device.type == "cuda" and not across_hosts:
        first = device.index or 0
        count = torch.cuda.device_count()
        if first + world_size > count:
            raise ValueError(
                f"tensor_parallel_size={world_size} needs GPUs {first}..{first + world_size - 1} "
                f"(one per rank from device={str(device)!r}), but {count} are visible"
            )


def _resolve_speculative(
    spec: SpeculativeConfig | None, target: ModelConfig
) -> SpeculativeConfig | None:
    """draft_model, eagle3: the draft's ModelConfig, checked against the target's. It runs in the
    target's dtype, KV-cache dtype, max_model_len and load format (random weights with
    --load-format dummy), with its checkpoint's own quantization if it declares one, and reads
    token ids only (the target's tokenizer is the one used). eagle3 also resolves the target
    layers that feed the head (`_eagle3_layer_ids`)."""
    if spec is None or spec.method not in _MODEL_METHODS:
        return spec
    from compiled_llm.models.loader import check_weights, load_hf_config, resolve_model
    from compiled_llm.models.registry import (
        EAGLE3_ARCHITECTURES,
        architecture_of,
        resolve_model_impl,
    )

    assert spec.model is not None
    try:
        path = resolve_model(spec.model)
    except ValueError as e:
        raise ValueError(f"speculative_config.model: {e}") from None
    if target.load_format == "auto":
        check_weights(path)
    hf_config = load_hf_config(path, target.trust_remote_code)
    arch = architecture_of(hf_config)
    if spec.method == "eagle3" and arch not in EAGLE3_ARCHITECTURES:
        raise ValueError(
            f"speculative_config.model {spec.model!r} declares architecture {arch or '(none)'!r}, "
            f"not an EAGLE-3 head; method 'eagle3' reads {', '.join(EAGLE3_ARCHITECTURES)}"
        )
    if spec.method == "draft_model" and arch in EAGLE3_ARCHITECTURES:
        raise ValueError(
            f"speculative_config.model {spec.model!r} is an EAGLE-3 head ({arch}); use "
            "speculative_config.method 'eagle3'"
        )
    vocab, target_vocab = int(hf_config.vocab_size), int(target.hf_config.vocab_size)
    if vocab != target_vocab:
        raise ValueError(
            f"speculative_config.model {spec.model!r} has vocab_size={vocab}, the target has "
            f"{target_vocab}: a draft model must use the target's tokenizer and vocabulary"
        )
    max_pos = int(getattr(hf_config, "max_position_embeddings", 0) or 8192)
    if spec.method == "draft_model" and target.max_model_len > max_pos:
        # (an EAGLE-3 head's max_position_embeddings is its training length, not a limit of
        # its RoPE table, which is built for max_model_len)
        raise ValueError(
            f"speculative_config.model {spec.model!r} has max_position_embeddings={max_pos}, "
            f"below max_model_len={target.max_model_len}; lower max_model_len"
        )
    layer_ids: tuple[int, ...] = ()
    if spec.method == "eagle3":
        layer_ids = _eagle3_layer_ids(spec.model, hf_config, target)
    draft = dataclasses.replace(
        target,
        model=path,
        hf_config=hf_config,
        skip_tokenizer_init=True,
        model_impl=resolve_model_impl(hf_config, "auto"),
        quantization=_resolve_quantization(None, hf_config),
    )
    return dataclasses.replace(
        spec, draft_model_config=draft, eagle_aux_hidden_state_layer_ids=layer_ids
    )


def _eagle3_layer_ids(name: str, head: Any, target: ModelConfig) -> tuple[int, ...]:
    """The target layers whose inputs feed an EAGLE-3 head, checked against the target: the
    head's `eagle_aux_hidden_state_layer_ids` (top level or in `eagle_config`, as vLLM reads
    them), else EAGLE-3's (2, L // 2, L - 3). Its `fc` takes three of the target's hidden states
    (`target_hidden_size`, or its own hidden_size where it has none)."""
    if target.model_impl != "native":
        raise ValueError(
            "speculative_config.method 'eagle3' needs a native target model class (the target's "
            "decoder layers hand the head their hidden states); model_impl is "
            f"{target.model_impl!r}"
        )
    hidden = int(getattr(head, "target_hidden_size", None) or head.hidden_size)
    target_hidden = int(target.hf_config.hidden_size)
    if hidden != target_hidden:
        raise ValueError(
            f"speculative_config.model {name!r} was trained on a target of hidden size {hidden} "
            f"(its target_hidden_size, else hidden_size), the target has {target_hidden}"
        )
    draft_vocab = getattr(head, "draft_vocab_size", None)
    if draft_vocab is not None and not 1 <= int(draft_vocab) <= int(head.vocab_size):
        raise ValueError(
            f"speculative_config.model {name!r} has draft_vocab_size={draft_vocab}, outside "
            f"1..vocab_size={head.vocab_size}"
        )
    eagle_config = getattr(head, "eagle_config", None) or {}
    if isinstance(eagle_config, dict) and eagle_config.get("use_aux_hidden_state") is False:
        raise ValueError(
            f"speculative_config.model {name!r} sets eagle_config.use_aux_hidden_state=false (an "
            "EAGLE-1 style head); only EAGLE-3 heads, fed three target layers, are supported"
        )
    if int(head.num_hidden_layers) != 1:
        raise ValueError(
            f"speculative_config.model {name!r} has num_hidden_layers={head.num_hidden_layers}; "
            "EAGLE-3 heads of one layer (midlayer) are supported"
        )
    if getattr(head, "norm_before_residual", False):
        raise ValueError(
            f"speculative_config.model {name!r} sets norm_before_residual=true, which is not "
            "supported (the head's residual is its un-normed hidden state)"
        )
    ids = getattr(head, "eagle_aux_hidden_state_layer_ids", None)
    if not ids and isinstance(eagle_config, dict):
        ids = eagle_config.get("eagle_aux_hidden_state_layer_ids")
    num_layers = target.num_layers
    if not ids:
        ids = [2, num_layers // 2, num_layers - 3]
    ids = list(ids)
    if len(ids) != 3 or not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_layers for i in ids
    ):
        raise ValueError(
            f"speculative_config.model {name!r}: eagle_aux_hidden_state_layer_ids={ids} must be "
            f"three layer indices in 0..{num_layers - 1} (the target has {num_layers} layers; "
            "EAGLE-3's default (2, L // 2, L - 3) needs at least 4)"
        )
    return tuple(ids)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but CUDA is not available")
    return device


def _resolve_dtype(name: str, hf_config: Any, device: torch.device) -> torch.dtype:
    if name != "auto":
        if name not in _DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {name!r}")
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    declared = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = _DTYPES.get(declared)
    return declared if declared in (torch.bfloat16, torch.float16) else torch.bfloat16


def _resolve_quantization(name: str | None, hf_config: Any) -> QuantizationConfig | None:
    """The checkpoint's quantization where its config.json declares one (refused by name if we
    do not run it), else the user's `quantization` applied to the float weights at load."""
    from compiled_llm.quantization import from_checkpoint, online

    raw = getattr(hf_config, "quantization_config", None)
    if raw:
        config = from_checkpoint(dict(raw))
        if name is not None and name != config.method:
            raise ValueError(
                f"quantization={name!r} was requested, but the checkpoint is quantized "
                f"({config.describe()}); leave quantization unset"
            )
        return config
    return online(name) if name is not None else None


def default_max_num_seqs(device_memory: int | None) -> int:
    """Requests per step unless set: 512 on a GPU of 70 GiB or more (H100, H200), else 256.

    A big GPU holds the KV cache of many more requests, and a decode step's GEMMs become
    compute-bound only past a few hundred rows, so offline throughput grows up to 512 requests
    a step (README: H200 offline throughput). Not vLLM's 1,024 on such GPUs: decode batches
    above 512, the largest decode CUDA graph, run without graphs and measured slower per token.
    `device_memory`: bytes, None on CPU."""
    return 512 if device_memory is not None and device_memory >= 70 * 2**30 else 256


def _device_memory(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return int(torch.cuda.get_device_properties(device).total_memory)


def _default_level(device: torch.device) -> int:
    if device.type == "cuda":
        return 2
    if Envs.read().cxx or shutil.which("g++") or shutil.which("c++"):
        return 1
    import logging

    logging.getLogger(__name__).warning(
        "no C++ compiler found: running eagerly (-O0); install g++ to compile the model on CPU"
    )
    return 0
