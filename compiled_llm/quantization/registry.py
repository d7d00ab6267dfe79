"""Quantization methods by name (`quantization="fp8"`, vLLM's names), imported lazily."""

from __future__ import annotations

import importlib

from compiled_llm.quantization.base import QuantizationMethod
from compiled_llm.quantization.config import QuantizationConfig

_METHODS: dict[str, str] = {
    "fp8": "compiled_llm.quantization.fp8:Fp8Method",
}


def quantization_methods() -> tuple[str, ...]:
    return tuple(_METHODS)


def check_method(name: str) -> None:
    if name not in _METHODS:
        raise ValueError(
            f"quantization must be one of {', '.join(_METHODS)} (or unset), got {name!r}"
        )


def get_quantization_method(config: QuantizationConfig) -> QuantizationMethod:
    check_method(config.method)
    module_name, _, attr = _METHODS[config.method].partition(":")
    cls: type[QuantizationMethod] = getattr(importlib.import_module(module_name), attr)
    return cls(config)
