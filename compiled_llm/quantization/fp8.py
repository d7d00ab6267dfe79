"""FP8 (E4M3) weights: `Fp8Linear` replaces a model's `nn.Linear` layers at load.

Parameters, named as checkpoints name them:
- `weight` [N, K] in E4M3;
- `weight_scale` float32: [N, 1] (one scale per output channel; a checkpoint's per-tensor scale
  is repeated per channel at load, which computes the same) or [ceil(N / bn), ceil(K / bk)]
  (one per bn x bk block; HF checkpoints call it `weight_scale_inv`);
- `input_scale` float32 [1]: a checkpoint's calibrated activation scale (static schemes only;
  otherwise activations are scaled per token, or per token and block column, at run time);
- `bias` in the model's dtype.

Tensor parallelism (the model is sharded before this transform runs): every scale has the
weight's output dimension first, so a column-parallel layer's scales split by rows with its
weight; a row-parallel layer (input columns split) keeps whole per-channel scales, which online
quantization takes as the maximum over the ranks' shards, so they equal the unsharded layer's,
and its block scales split along K at block boundaries (`Fp8Method.checkpoint_slices`). A
row-parallel layer's `Fp8Linear` keeps the all-reduce of the `RowParallelLinear` it replaces
(`tp`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import ClassVar

import torch
from torch import nn

import compiled_llm.kernels  # noqa: F401  (registers the ops)
from compiled_llm.distributed.parallel import TensorParallel
from compiled_llm.distributed.plan import ShardSpec
from compiled_llm.distributed.transform import output_reduced_over
from compiled_llm.kernels.fp8 import FP8_DTYPE, amax_scale, fp8_linear, quantize, quantize_weight
from compiled_llm.quantization.base import (
    QuantizationMethod,
    SliceRule,
    eligible_linears,
    replace_module,
)


class Fp8Linear(nn.Module):
    """`y = x @ dequant(weight).T + bias` through `kernels.fp8.fp8_linear`: activations are
    quantized to E4M3 too, and the GEMM multiplies FP8 operands. With `tp` (a row-parallel
    layer: its weight holds this rank's input columns) the product is summed over the group
    first and the bias added once, after the sum, as in `RowParallelLinear`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        block_size: tuple[int, int] | None = None,
        static_input_scale: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,  # of the bias (and the outputs: the input's dtype)
        tp: TensorParallel | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.tp = tp
        self.block_size: list[int] = list(block_size) if block_size else []
        if block_size:
            bn, bk = block_size
            scale_shape = (-(-out_features // bn), -(-in_features // bk))
        else:
            scale_shape = (out_features, 1)

        def param(shape: tuple[int, ...], dt: torch.dtype | None) -> nn.Parameter:
            return nn.Parameter(torch.empty(shape, dtype=dt, device=device), requires_grad=False)

        self.weight = param((out_features, in_features), FP8_DTYPE)
        self.weight_scale = param(scale_shape, torch.float32)
        self.input_scale = param((1,), torch.float32) if static_input_scale else None
        self.bias = param((out_features,), dtype) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: tuple[int, int] | None = None) -> Fp8Linear:
        """`linear`'s float weight quantized (per output channel, or per block). A
        `RowParallelLinear` holds part of each output channel: its per-channel scales come from
        the channel's maximum over all ranks (one all-reduce at load), so every rank quantizes
        with the unsharded layer's scales."""
        w = linear.weight.detach()
        tp = output_reduced_over(linear)
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            block_size,
            device=w.device,
            dtype=linear.bias.dtype if linear.bias is not None else w.dtype,
            tp=tp,
        )
        if tp is not None and block_size is None:
            scale = amax_scale(tp.max_over_ranks(w.abs().amax(dim=1, keepdim=True).float()))
            q = quantize(w, scale)
        else:
            q, scale = quantize_weight(w, block_size)
        layer.weight.data, layer.weight_scale.data = q, scale
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach()  # type: ignore[union-attr]
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, scale, block, x_scale = self.weight, self.weight_scale, self.block_size, self.input_scale
        if self.tp is None:
            return fp8_linear(x, w, scale, self.bias, block, x_scale)
        y = self.tp.all_reduce(fp8_linear(x, w, scale, None, block, x_scale))
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        scales = f"block={self.block_size}" if self.block_size else "per_channel"
        static = ", static_input_scale" if self.input_scale is not None else ""
        rank = f", rank={self.tp.rank}/{self.tp.world_size}" if self.tp is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {scales}{static}{rank}"
        )


class Fp8Method(QuantizationMethod):
    name: ClassVar[str] = "fp8"

    def prepare(self, model: nn.Module) -> int:
        c = self.config
        linears = eligible_linears(model, c)
        for name, linear in linears:
            layer = Fp8Linear(
                linear.in_features,
                linear.out_features,
                linear.bias is not None,
                c.weight_block_size,
                c.activation_strategy == "static",
                device=linear.weight.device,
                dtype=linear.weight.dtype,
                tp=output_reduced_over(linear),
            )
            replace_module(model, name, layer)
        return len(linears)

    def checkpoint_slices(self, model: nn.Module, weight_slices: SliceRule) -> SliceRule:
        """Scales follow their weight's slice: per-channel scales split with a column-parallel
        weight's rows and stay whole for a row-parallel one (each output channel is on every
        rank); block scales split with the weight along either dim, which must then hold a
        whole number of blocks per rank (ValueError naming the layer, before anything is
        read); per-tensor scales are read whole."""
        scale_slices: dict[str, ShardSpec] = {}
        for name, layer in model.named_modules():
            if not isinstance(layer, Fp8Linear):
                continue
            spec = weight_slices(f"{name}.weight")
            if spec is None:
                continue
            if layer.block_size:
                local, block = layer.weight.shape[spec.dim], layer.block_size[spec.dim]
                if local % block:
                    what = "output rows" if spec.dim == 0 else "input columns"
                    raise ValueError(
                        f"tensor parallelism cannot split the FP8 block scales of {name!r}: "
                        f"each rank holds {local} of its {what}, not a whole number of "
                        f"{block}-wide blocks (weight_block_size={list(layer.block_size)}); "
                        "choose a tensor_parallel_size that splits it into whole blocks"
                    )
                scale_slices[name] = spec
            elif self.config.weight_strategy == "channel" and spec.dim == 0:
                scale_slices[name] = spec

        def rule(name: str) -> ShardSpec | None:
            owner, _, leaf = name.rpartition(".")
            if leaf in ("weight_scale", "weight_scale_inv"):
                return scale_slices.get(owner)
            return weight_slices(name)

        return rule

    def checkpoint_weights(
        self, model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        layers = {n: m for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
        for name, tensor in weights:
            owner, _, leaf = name.rpartition(".")
            layer = layers.get(owner)
            if layer is None:
                yield name, tensor
                continue
            if leaf == "weight" and tensor.dtype != FP8_DTYPE:
                raise ValueError(
                    f"checkpoint tensor {name!r} is {tensor.dtype}, but the quantization_config "
                    f"says the layer is stored in {FP8_DTYPE}"
                )
            if leaf == "weight_scale_inv":  # HF's name for the block scales (multipliers)
                leaf = "weight_scale"
            if leaf == "weight_scale" and not layer.block_size:
                if tensor.numel() == 1:  # per tensor: the same scale for every channel
                    tensor = tensor.reshape(1, 1).expand(layer.out_features, 1).contiguous()
                tensor = tensor.reshape(layer.out_features, 1)
            elif leaf == "input_scale":
                if layer.input_scale is None:
                    continue  # dynamic activations: a calibration left over is not used
                if tensor.numel() != 1:
                    raise ValueError(
                        f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}: only a "
                        "per-tensor static activation scale is supported"
                    )
                tensor = tensor.reshape(1)
            elif leaf.endswith("zero_point"):
                if bool(tensor.any()):
                    raise ValueError(f"checkpoint tensor {name!r}: asymmetric FP8 is not supported")
                continue
            yield f"{owner}.{leaf}", tensor

    def quantize(self, model: nn.Module) -> int:
        """Float weights to FP8 with the config's weight granularity (a checkpoint's
        per-tensor scheme runs per channel; without a checkpoint there is no calibrated
        activation scale, so a static scheme runs with dynamic per-token scales)."""
        linears = eligible_linears(model, self.config)
        with torch.no_grad():
            for name, linear in linears:
                replace_module(
                    model, name, Fp8Linear.from_linear(linear, self.config.weight_block_size)
                )
        return len(linears)
