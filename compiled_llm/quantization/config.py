"""What quantization a model runs with: one typed, frozen description, from `quantization="fp8"`
(weights quantized at load) or from a checkpoint's `quantization_config` (config.json).

Checkpoint formats read: HF's `quant_method: "fp8"` (128x128 block scales in
`weight_scale_inv`, dynamic activations; or per-tensor `weight_scale` with dynamic or static
activations, as vLLM writes them) and compressed-tensors FP8 (`quant_method:
"compressed-tensors"`, parsed by the compressed-tensors package: compressed_tensors.py). Any
other scheme is refused with a ValueError naming it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

SOURCES = ("online", "fp8", "compressed-tensors")
WEIGHT_STRATEGIES = ("channel", "tensor", "block")
# "token": a dynamic scale per token; "group": dynamic, per token and weight block column;
# "static": the checkpoint's calibrated per-tensor scale (input_scale).
ACTIVATION_STRATEGIES = ("token", "group", "static")
# Modules never quantized: the output head (compute_logits reads its weight directly, and the
# logits are the most sensitive GEMM); embeddings are not nn.Linear and are never touched.
ALWAYS_IGNORED = ("lm_head",)


@dataclass(frozen=True)
class QuantizationConfig:
    method: str  # the registry name of the quantization method: "fp8"
    source: str  # "online" (float weights quantized at load) or the checkpoint's format
    weight_strategy: str  # "channel", "tensor" (stored per tensor, run per channel) or "block"
    weight_block_size: tuple[int, int] | None  # (rows, columns) of a scale block
    activation_strategy: str
    ignore: tuple[str, ...] = ()  # module names or "re:" patterns left in full precision

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if self.weight_strategy not in WEIGHT_STRATEGIES:
            raise ValueError(
                f"weight_strategy must be one of {', '.join(WEIGHT_STRATEGIES)}, "
                f"got {self.weight_strategy!r}"
            )
        if self.activation_strategy not in ACTIVATION_STRATEGIES:
            raise ValueError(
                f"activation_strategy must be one of {', '.join(ACTIVATION_STRATEGIES)}, "
                f"got {self.activation_strategy!r}"
            )
        block = self.weight_block_size
        if (self.weight_strategy == "block") != (block is not None):
            raise ValueError("weight_block_size is set exactly when weight_strategy is 'block'")
        if block is not None and (len(block) != 2 or min(block) < 1 or block[1] % 16):
            raise ValueError(
                f"weight_block_size must be two positive sizes, the second a multiple of 16, "
                f"got {block}"
            )
        if (self.activation_strategy == "group") != (block is not None):
            raise ValueError(
                "activations are quantized per group of the weight's block width exactly when "
                f"the weights are block-quantized (got {self.activation_strategy!r} activations "
                f"for {self.weight_strategy!r} weights)"
            )

    @property
    def prequantized(self) -> bool:
        """The checkpoint holds quantized weights (else float weights are quantized at load)."""
        return self.source != "online"

    def ignores(self, module_name: str) -> bool:
        """Whether the linear layer `module_name` stays in full precision."""
        last = module_name.rsplit(".", 1)[-1]
        for entry in (*ALWAYS_IGNORED, *self.ignore):
            if entry.startswith("re:"):
                if re.match(entry[3:], module_name):
                    return True
            elif module_name == entry or module_name.endswith("." + entry) or last == entry:
                return True
        return False

    def describe(self) -> str:
        block = (
            f" {self.weight_block_size[0]}x{self.weight_block_size[1]}"
            if self.weight_block_size
            else ""
        )
        return (
            f"{self.method} ({self.source}): weights per {self.weight_strategy}{block}, "
            f"activations {self.activation_strategy}"
        )


def online(method: str) -> QuantizationConfig:
    """`quantization=method` on a float checkpoint: per-output-channel weight scales, dynamic
    per-token activation scales."""
    return QuantizationConfig(method, "online", "channel", None, "token")


# Checkpoint quantization methods we do not run, by their config name (what users see).
_REFUSED_METHODS = {
    "awq": "AWQ (int4 weights)",
    "gptq": "GPTQ (int weights)",
    "gptq_marlin": "GPTQ (int weights)",
    "awq_marlin": "AWQ (int4 weights)",
    "bitsandbytes": "bitsandbytes",
    "hqq": "HQQ",
    "eetq": "EETQ (int8)",
    "aqlm": "AQLM",
    "quanto": "quanto",
    "torchao": "torchao",
    "fbgemm_fp8": "FBGEMM FP8",
    "mxfp4": "MXFP4",
    "quark": "Quark",
    "bitnet": "BitNet",
    "spqr": "SpQR",
    "vptq": "VPTQ",
    "higgs": "HIGGS",
    "auto-round": "AutoRound",
}


def from_checkpoint(raw: dict[str, Any]) -> QuantizationConfig:
    """The quantization a checkpoint's `quantization_config` declares, or a ValueError naming a
    scheme we do not run."""
    method = str(raw.get("quant_method", "")).lower()
    if method == "fp8":
        return _hf_fp8(raw)
    if method == "compressed-tensors":
        from compiled_llm.quantization.compressed_tensors import parse

        return parse(raw)
    if method == "modelopt":
        algo = raw.get("quant_algo") or raw.get("quantization", {}).get("quant_algo")
        name = f"ModelOpt {algo}" if algo else "ModelOpt"
    else:
        name = _REFUSED_METHODS.get(method, method or "(no quant_method)")
    raise ValueError(
        f"the checkpoint's quantization scheme {name} (quantization_config.quant_method="
        f"{method!r}) is not supported; supported: FP8 checkpoints (quant_method 'fp8', or "
        "'compressed-tensors' with FP8 weights and activations), or quantization='fp8' on a "
        "float checkpoint"
    )


def _hf_fp8(raw: dict[str, Any]) -> QuantizationConfig:
    """HF's fine-grained FP8 (`weight_block_size`, `weight_scale_inv`) or, without a block
    size, per-tensor FP8 (`weight_scale`, and `input_scale` when activations are static)."""
    scheme = str(raw.get("activation_scheme", "dynamic"))
    if scheme not in ("dynamic", "static"):
        raise ValueError(
            f"quantization_config.activation_scheme must be 'dynamic' or 'static', got {scheme!r}"
        )
    fmt = raw.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"FP8 checkpoint with fmt={fmt!r} is not supported (E4M3 only)")
    ignore = tuple(raw.get("modules_to_not_convert") or raw.get("ignored_layers") or ())
    block = raw.get("weight_block_size")
    if block is not None:
        if scheme != "dynamic":
            raise ValueError(
                "FP8 checkpoint with weight_block_size and static activation scales is not "
                "supported (block-quantized weights take dynamic per-group activations)"
            )
        return QuantizationConfig(
            "fp8", "fp8", "block", (int(block[0]), int(block[1])), "group", ignore
        )
    activations = "static" if scheme == "static" else "token"
    return QuantizationConfig("fp8", "fp8", "tensor", None, activations, ignore)
