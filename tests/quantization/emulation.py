"""The oracle of the FP8 model tests: HF transformers' float32 model with each linear layer
(but the output head) replaced by a fake-quantized one — its weight dequantized from FP8, its
input quantized and dequantized per token (or per 128-column group, or with a static scale) by
the compressed-tensors package, an implementation of FP8 quantization independent of ours —
and FP8 checkpoints written from a float model in each format we load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

FP8 = torch.float8_e4m3fn


def args(strategy: str, dynamic: bool = False, group_size: int | None = None) -> Any:
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(
        num_bits=8, type="float", strategy=strategy, dynamic=dynamic, group_size=group_size
    )


def ct_quantize(w: torch.Tensor, strategy: str, block: tuple[int, int] | None = None):
    """(E4M3 tensor, scale) of a weight by compressed-tensors' own qparams and rounding."""
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    w = w.float()
    if strategy == "tensor":
        lo, hi = w.min().reshape(1), w.max().reshape(1)
        a = args("tensor")
    elif strategy == "channel":
        lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
        a = args("channel")
    else:
        assert block is not None
        bn, bk = block
        n, k = w.shape
        tiles = w.view(n // bn, bn, k // bk, bk)
        lo, hi = tiles.amin(dim=(1, 3)), tiles.amax(dim=(1, 3))
        from compressed_tensors.quantization import QuantizationArgs

        a = QuantizationArgs(
            num_bits=8, type="float", strategy="block", block_structure=list(block)
        )
    scale, zp = calculate_qparams(lo, hi, a)
    return quantize(w, scale, zp, a, dtype=FP8), scale


def dequant(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    if block is None:
        return q.float() * scale.float().reshape(-1, 1) if scale.numel() > 1 else q.float() * scale
    bn, bk = block
    s = scale.float().repeat_interleave(bn, 0).repeat_interleave(bk, 1)
    return q.float() * s[: q.shape[0], : q.shape[1]]


class FakeQuantLinear(nn.Module):
    """F.linear(fake_quant(x), dequantized weight): what an FP8 linear computes, in float32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act: Any, scale=None):
        super().__init__()
        self.weight, self.bias, self.act, self.scale = weight, bias, act, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from compressed_tensors.quantization.lifecycle.forward import fake_quantize
        from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

        if self.scale is not None:
            scale, zp = self.scale, torch.zeros_like(self.scale)
        else:
            scale, zp = compute_dynamic_scales_and_zp(x, self.act, self)
        xq = fake_quantize(x, scale, zp, self.act)
        return nn.functional.linear(xq, self.weight, self.bias)


def emulate(model: nn.Module, weights: dict[str, tuple], act: Any, static: dict | None = None):
    """`model`'s linears (named in `weights`: name -> (dequantized weight, bias)) replaced."""
    for name, (w, b) in weights.items():
        parent, _, child = name.rpartition(".")
        scale = (static or {}).get(name)
        setattr(model.get_submodule(parent), child, FakeQuantLinear(w, b, act, scale))
    return model


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]


def calibrate(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Static per-tensor input scales (amax / 448) of every linear, from one forward of `ids`."""
    amax: dict[str, torch.Tensor] = {}
    hooks = []
    for name in linear_names(model):

        def hook(_m: nn.Module, inputs: tuple, name: str = name) -> None:
            amax[name] = inputs[0].detach().abs().amax().float()

        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return {n: (a / 448.0).reshape(1) for n, a in amax.items()}


def write_checkpoint(src: Path, dst: Path, fmt: str, calib: torch.Tensor | None = None) -> dict:
    """An FP8 checkpoint of the float model in `src`, in format `fmt`: "ct-dynamic"
    (compressed-tensors FP8_DYNAMIC: per-channel weights, dynamic per-token activations),
    "ct-static" (compressed-tensors FP8: per-tensor weights, static activation scales from
    `calib` tokens), "hf-block" (HF fine-grained FP8: 128x128 blocks, `weight_scale_inv`),
    "hf-tensor" (quant_method fp8 without blocks: per-tensor weights, dynamic activations).
    Returns {linear name: (dequantized weight, bias, static input scale or None)}."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    names = linear_names(model)
    static = calibrate(model, calib) if fmt == "ct-static" else {}
    out, emulated = dict(tensors), {}
    block = (128, 128) if fmt == "hf-block" else None
    strategy = {"ct-dynamic": "channel", "ct-static": "tensor", "hf-tensor": "tensor"}.get(
        fmt, "block"
    )
    for name in names:
        w = tensors[f"{name}.weight"]
        q, scale = ct_quantize(w, strategy, block)
        out[f"{name}.weight"] = q
        out[f"{name}.weight_scale_inv" if fmt == "hf-block" else f"{name}.weight_scale"] = (
            scale.to(torch.bfloat16) if fmt == "ct-dynamic" else scale  # as llm-compressor does
        )
        if fmt == "ct-static":
            out[f"{name}.input_scale"] = static[name]
        # bf16-stored scales round-trip through bf16: the emulation uses what was stored.
        stored = out[f"{name}.weight_scale_inv" if fmt == "hf-block" else f"{name}.weight_scale"]
        bias = tensors.get(f"{name}.bias")
        emulated[name] = (dequant(q, stored, block), bias, static.get(name))
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = quantization_config(fmt)
    (dst / "config.json").write_text(json.dumps(config))
    return emulated


def quantization_config(fmt: str) -> dict:
    if fmt == "hf-block":
        return {
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        }
    if fmt == "hf-tensor":
        return {"quant_method": "fp8", "activation_scheme": "dynamic"}
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    preset = {"ct-dynamic": "FP8_DYNAMIC", "ct-static": "FP8"}[fmt]
    cfg = QuantizationConfig(
        config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])},
        ignore=["lm_head"],
        format="float-quantized",
    )
    return cfg.model_dump()
