"""Quantization as a transform of plain models (docs/quantization.md): a typed config from the
user's `quantization=` or the checkpoint's `quantization_config`, and methods by name that
swap a model's linear layers for quantized ones at load."""

from compiled_llm.quantization.base import QuantizationMethod
from compiled_llm.quantization.config import QuantizationConfig, from_checkpoint, online
from compiled_llm.quantization.registry import (
    check_method,
    get_quantization_method,
    quantization_methods,
)

__all__ = [
    "QuantizationConfig",
    "QuantizationMethod",
    "check_method",
    "from_checkpoint",
    "get_quantization_method",
    "online",
    "quantization_methods",
]
