"""Typed, frozen engine configuration.

`EngineArgs` is the flat keyword surface users see (`LLM(**kwargs)`, CLI flags); `create_config()`
validates it once and splits it into the frozen configs each part of the engine reads.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

import torch

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
    seed: int = 0
    load_format: str = "auto"  # "auto": the checkpoint's weights; "dummy": random, made on device
    skip_tokenizer_init: bool = False  # token ids in and out only (benchmarks)

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
        hd = getattr(self.hf_config, "head_dim", None)
        return int(hd) if hd else int(self.hf_config.hidden_size) // self.num_heads


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None  # explicit budget; required meaning on CPU
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError("kv_cache_memory_bytes must be positive")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError("num_gpu_blocks_override must be at least 1")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 8192
    enable_chunked_prefill: bool = True
    async_scheduling: bool = False

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}"
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                "max_num_batched_tokens must be >= max_model_len when chunked prefill is off"
            )


@dataclass(frozen=True)
class CompilationConfig:
    """How the model forward is captured and compiled (see compiled_llm/compilation)."""

    level: int = 0  # 0 eager, 1 compile, 2 compile + CUDA graphs
    passes: tuple[str, ...] = ()  # "+name" / "-name" edits of the default pipeline
    cudagraph_capture_sizes: tuple[int, ...] | None = None
    splitting_ops: tuple[str, ...] | None = None
    compile_cache_dir: str | None = None
    compile_dump_dir: str | None = None

    def __post_init__(self) -> None:
        if self.level not in (0, 1, 2):
            raise ValueError(f"compilation level (-O) must be 0, 1 or 2, got {self.level}")


@dataclass(frozen=True)
class ObservabilityConfig:
    profile_dir: str | None = None
    nvtx: bool = False


@dataclass(frozen=True)
class EngineConfig:
    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    compilation_config: CompilationConfig
    observability_config: ObservabilityConfig
    device: torch.device
    attention_backend: str = "auto"


@dataclass
class EngineArgs:
    """Keyword arguments accepted by `LLM(...)`, named as in vLLM where vLLM has them."""

    model: str | None = None
    tokenizer: str | None = None
    skip_tokenizer_init: bool = False
    load_format: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True
    async_scheduling: bool = True
    device: str = "auto"
    attention_backend: str = "auto"
    compilation_level: int | None = None  # -O; None picks the platform default
    enforce_eager: bool = False
    passes: list[str] | tuple[str, ...] = field(default_factory=tuple)
    cudagraph_capture_sizes: list[int] | tuple[int, ...] | None = None
    compile_cache_dir: str | None = None
    compile_dump_dir: str | None = None
    profile_dir: str | None = None
    nvtx: bool = False

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(unknown)}")
        return cls(**kwargs)

    def create_config(self) -> EngineConfig:
        from compiled_llm.models.loader import load_hf_config, resolve_model

        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto or dummy, got {self.load_format!r}")
        device = _resolve_device(self.device)
        model_path = resolve_model(self.model)
        hf_config = load_hf_config(model_path)
        dtype = _resolve_dtype(self.dtype, hf_config, device)
        max_pos = int(getattr(hf_config, "max_position_embeddings", 0) or 8192)
        max_model_len = self.max_model_len or max_pos
        if max_model_len < 1:
            raise ValueError(f"max_model_len must be at least 1, got {max_model_len}")
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
            tokenizer=resolve_model(self.tokenizer) if self.tokenizer else model_path,
            seed=self.seed,
            load_format=self.load_format,
            skip_tokenizer_init=self.skip_tokenizer_init,
        )
        level = 0 if self.enforce_eager else self.compilation_level
        if level is None:
            level = _default_level(device)
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
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=self.max_num_batched_tokens or max(8192, self.max_num_seqs),
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
        )


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


def _default_level(device: torch.device) -> int:
    if device.type == "cuda":
        return 2
    if os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++"):
        return 1
    import logging

    logging.getLogger(__name__).warning(
        "no C++ compiler found: running eagerly (-O0); install g++ to compile the model on CPU"
    )
    return 0
