"""Attention backends by name, imported lazily so a missing optional dependency only matters
when that backend is asked for."""

from __future__ import annotations

import importlib

from compiled_llm.attention_backends.base import AttentionBackend, AttentionSpec

_BACKENDS: dict[str, tuple[str, str]] = {
    "torch": ("compiled_llm.attention_backends.torch_ref", "TorchAttentionBackend"),
    "triton": ("compiled_llm.attention_backends.triton_backend", "TritonAttentionBackend"),
    "flashinfer": ("compiled_llm.attention_backends.flashinfer", "FlashInferAttentionBackend"),
}

_INSTALL_HINT = {
    "triton": "pip install triton (it ships with torch's CUDA builds)",
    "flashinfer": "pip install 'compiled-llm[gpu]' (flashinfer-python==0.6.18.post1 and apache-tvm-ffi)",
}


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def get_backend_class(name: str) -> type[AttentionBackend]:
    if name not in _BACKENDS:
        raise ValueError(
            f"attention_backend must be one of auto, {', '.join(available_backends())}; got {name!r}"
        )
    module_name, class_name = _BACKENDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"attention_backend={name!r} needs a package that is not installed ({e}); "
            f"install it with: {_INSTALL_HINT.get(name, 'pip install ' + name)}"
        ) from e
    cls: type[AttentionBackend] = getattr(module, class_name)
    return cls


# `auto` on CUDA: the first of these that is importable and serves the model's layers. Our Triton
# kernels come first: on the H200 (Llama-3.1-8B heads) their CUDA-graph decode is as fast as
# FlashInfer's tensor-core decode or faster at every batch and context measured but one (16 x 16k:
# 293 against 265 us), up to 1.28x at 256-512 requests of a few hundred tokens, and need no nvcc
# at first use (docs/attention_backends.md, "Which backend auto picks").
AUTO_CUDA_ORDER = ("triton", "flashinfer")


def resolve_backend_name(name: str, spec: AttentionSpec) -> str:
    """`auto` means the first of AUTO_CUDA_ORDER that is importable on CUDA, torch on CPU; on
    CUDA a backend that refuses the spec's layers (`AttentionBackend.refusal`) is passed over."""
    if name != "auto":
        get_backend_class(name)  # validates the name and checks the dependency
        return name
    if spec.device.type != "cuda":
        return "torch"
    for candidate in AUTO_CUDA_ORDER:
        try:
            cls = get_backend_class(candidate)
        except ValueError:
            continue
        if cls.refusal(spec) is None:
            return candidate
    return "torch"


def create_backend(name: str, spec: AttentionSpec) -> AttentionBackend:
    """The backend `name` (or `auto`'s choice for the spec), built for `spec`."""
    return get_backend_class(resolve_backend_name(name, spec))(spec)
