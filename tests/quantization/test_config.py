"""Quantization configs: the user's `quantization`, checkpoints' `quantization_config` in each
supported format, and every unsupported scheme refused with a ValueError naming it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from compiled_llm import LLM
from compiled_llm.config import EngineArgs
from compiled_llm.quantization import QuantizationConfig, from_checkpoint
from tests.quantization.emulation import quantization_config


def test_engine_arg() -> None:
    with pytest.raises(ValueError, match="quantization must be one of fp8"):
        EngineArgs(quantization="int4")
    from compiled_llm.cli.args import Parser, add_engine_args

    parser = Parser()
    add_engine_args(parser)
    assert parser.parse_args(["--quantization", "fp8"]).quantization == "fp8"
    with pytest.raises(SystemExit):
        parser.parse_args(["--quantization", "awq"])


@pytest.mark.parametrize(
    "fmt, expected",
    [
        ("hf-block", ("fp8", "block", (128, 128), "group", ())),
        ("hf-tensor", ("fp8", "tensor", None, "token", ())),
        ("ct-dynamic", ("compressed-tensors", "channel", None, "token", ("lm_head",))),
        ("ct-static", ("compressed-tensors", "tensor", None, "static", ("lm_head",))),
    ],
)
def test_supported_checkpoint_configs(fmt: str, expected: tuple) -> None:
    c = from_checkpoint(quantization_config(fmt))
    assert (
        c.source,
        c.weight_strategy,
        c.weight_block_size,
        c.activation_strategy,
        c.ignore,
    ) == expected
    assert c.method == "fp8" and c.prequantized


def test_compressed_tensors_block_and_dynamic_tensor() -> None:
    from compressed_tensors.quantization import QuantizationConfig as CT
    from compressed_tensors.quantization import QuantizationScheme, preset_name_to_scheme

    block = CT(
        config_groups={"g": preset_name_to_scheme("FP8_BLOCK", ["Linear"])},
        format="float-quantized",
    ).model_dump()
    c = from_checkpoint(block)
    assert (c.weight_strategy, c.weight_block_size, c.activation_strategy) == (
        "block",
        (128, 128),
        "group",
    )
    # Dynamic per-tensor activation scales run per token.
    scheme = preset_name_to_scheme("FP8", ["Linear"]).model_dump()
    scheme["input_activations"]["dynamic"] = True
    dynamic = CT(
        config_groups={"g": QuantizationScheme.model_validate(scheme)}, format="float-quantized"
    ).model_dump()
    assert from_checkpoint(dynamic).activation_strategy == "token"


def ct_config(preset: str, fmt: str = "float-quantized") -> dict:
    from compressed_tensors.quantization import QuantizationConfig as CT
    from compressed_tensors.quantization import preset_name_to_scheme

    return CT(
        config_groups={"g": preset_name_to_scheme(preset, ["Linear"])}, format=fmt
    ).model_dump()


@pytest.mark.parametrize(
    "raw, name",
    [
        ({"quant_method": "awq", "bits": 4, "group_size": 128}, "AWQ"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "GPTQ"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes"),
        ({"quant_method": "modelopt", "quant_algo": "NVFP4"}, "ModelOpt NVFP4"),
        ({"quant_method": "fp8", "fmt": "e5m2"}, "e5m2"),
        (
            {"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]},
            "static",
        ),
        ("W4A16", "W4A16 is"),
        ("W8A8", "W8A8"),
        ("NVFP4", "NVFP4"),
        ("W8A16", "W8A16"),
    ],
)
def test_unsupported_schemes_are_refused_by_name(raw: dict | str, name: str) -> None:
    if isinstance(raw, str):  # a compressed-tensors preset
        raw = ct_config(raw, "nvfp4-pack-quantized" if raw == "NVFP4" else "pack-quantized")
    with pytest.raises(ValueError, match=name):
        from_checkpoint(raw)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="weight_strategy"):
        QuantizationConfig("fp8", "online", "row", None, "token")
    with pytest.raises(ValueError, match="weight_block_size"):
        QuantizationConfig("fp8", "fp8", "block", None, "group")
    with pytest.raises(ValueError, match="per group"):
        QuantizationConfig("fp8", "fp8", "block", (128, 128), "token")
    with pytest.raises(ValueError, match="multiple of 16"):
        QuantizationConfig("fp8", "fp8", "block", (128, 100), "group")
    c = QuantizationConfig(
        "fp8", "online", "channel", None, "token", ("re:.*mlp\\.gate$", "o_proj")
    )
    assert c.ignores("lm_head") and c.ignores("model.layers.3.mlp.gate")
    assert c.ignores("model.layers.0.self_attn.o_proj")
    assert not c.ignores("model.layers.3.mlp.gate_proj")


def test_checkpoint_scheme_refused_at_load(tiny_models, tmp_path: Path) -> None:
    """An AWQ checkpoint fails when the engine is made, naming AWQ; asking for fp8 on an FP8
    checkpoint is fine, on another quantization an error."""
    path = tmp_path / "awq"
    shutil.copytree(tiny_models("llama"), path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="AWQ"):
        LLM(str(path), enforce_eager=True, device="cpu")
    config["quantization_config"] = quantization_config("hf-tensor")
    (path / "config.json").write_text(json.dumps(config))
    mc = EngineArgs(model=str(path), quantization="fp8").create_config().model_config
    assert mc.quantization is not None and mc.quantization.source == "fp8"
