"""compressed-tensors checkpoints (llm-compressor's output): the `quantization_config` is read by
the compressed-tensors package itself (its pydantic `QuantizationConfig`), and the FP8 schemes
we run are mapped onto our config. Imported only for such checkpoints (the package imports
transformers: seconds)."""

from __future__ import annotations

from typing import Any

from compiled_llm.quantization.config import QuantizationConfig

# Storage formats of FP8 weights stored as E4M3 tensors with their scales beside them.
_FP8_FORMATS = ("float-quantized", "naive-quantized")


def _describe(args: Any) -> str:
    if args is None:
        return "none"
    group = f" {args.group_size}" if args.group_size else ""
    return f"{args.type}{args.num_bits} per {args.strategy}{group}"


def _scheme_name(scheme: Any) -> str:
    """The compressed-tensors preset a scheme is (W4A16, NVFP4, ...), else a description."""
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    def key(args: Any) -> Any:
        if args is None:
            return None
        return (
            args.num_bits,
            str(args.type),
            str(args.strategy),
            args.group_size,
            args.dynamic,
            args.symmetric,
        )

    mine = (key(scheme.weights), key(scheme.input_activations))
    for name, preset in PRESET_SCHEMES.items():
        if (key(preset.get("weights")), key(preset.get("input_activations"))) == mine:
            return name
    return f"weights {_describe(scheme.weights)}, activations {_describe(scheme.input_activations)}"


def parse(raw: dict[str, Any]) -> QuantizationConfig:
    from compressed_tensors.quantization import QuantizationConfig as CTConfig

    try:
        ct = CTConfig.model_validate(raw)
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        raise ValueError(
            f"the checkpoint's compressed-tensors quantization_config is invalid: {e}"
        ) from e
    schemes = list(ct.config_groups.values())
    if not schemes:
        raise ValueError("the checkpoint's compressed-tensors quantization_config has no groups")
    found = {_map(s, str(s.format or ct.format)) for s in schemes}
    if len(found) > 1:
        raise ValueError(
            "compressed-tensors checkpoint with several different quantization schemes "
            f"({', '.join(_scheme_name(s) for s in schemes)}) is not supported"
        )
    if ct.kv_cache_scheme is not None:
        raise ValueError(
            "compressed-tensors checkpoint with a kv_cache_scheme (quantized KV cache) is not "
            "supported"
        )
    weight_strategy, block, activations = found.pop()
    return QuantizationConfig(
        "fp8", "compressed-tensors", weight_strategy, block, activations, tuple(ct.ignore or ())
    )


def _map(scheme: Any, fmt: str) -> tuple[str, tuple[int, int] | None, str]:
    """(weight strategy, block size, activation strategy) of one FP8 scheme, or a ValueError
    naming the scheme."""
    w, a = scheme.weights, scheme.input_activations
    name = _scheme_name(scheme)

    def refuse(why: str) -> ValueError:
        return ValueError(
            f"the checkpoint's compressed-tensors scheme {name} is not supported ({why}); "
            "supported: FP8 weights per tensor, channel or block with dynamic FP8 activations "
            "(or static per-tensor ones), i.e. the FP8, FP8_DYNAMIC and FP8_BLOCK schemes"
        )

    if list(scheme.targets) != ["Linear"]:
        raise refuse(f"targets {list(scheme.targets)}; only ['Linear']")
    if fmt not in _FP8_FORMATS:
        raise refuse(f"format {fmt!r}")
    if w is None or w.num_bits != 8 or str(w.type) != "float" or not w.symmetric:
        raise refuse("weights must be symmetric 8-bit float")
    if a is None:
        raise refuse("FP8 weight-only: activations must be FP8 too")
    if a.num_bits != 8 or str(a.type) != "float" or not a.symmetric:
        raise refuse("activations must be symmetric 8-bit float")
    if scheme.output_activations is not None:
        raise refuse("output activations are quantized")
    strategy = str(w.strategy)
    if strategy == "block":
        bn, bk = w.block_structure or (0, 0)
        if str(a.strategy) != "group" or a.dynamic is not True or a.group_size != bk:
            raise refuse("block weights need dynamic activations per group of the block width")
        return "block", (int(bn), int(bk)), "group"
    if strategy not in ("tensor", "channel"):
        raise refuse(f"weight strategy {strategy!r}")
    if a.dynamic is True and str(a.strategy) in ("token", "tensor"):
        # Dynamic per-tensor activation scales run per token: finer, never less accurate.
        return strategy, None, "token"
    if a.dynamic is False and str(a.strategy) == "tensor":
        return strategy, None, "static"
    raise refuse(f"activations {_describe(a)}, dynamic={a.dynamic}")
