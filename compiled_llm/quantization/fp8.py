"""FP8 (E4M3) weights: `Fp8Linear` replaces a model's `nn.Linear` layers at load.

Parameters, named as checkpoints name them:
- `weight` [N, K] in E4M3;
- `weight_scale` float32: [N, 1] (one scale per output channel; a checkpoint's per-tensor scale
  is repeated per channel at load, which computes the same) or [ceil(N / bn), ceil(K / bk)]
  (one per bn x bk block; HF checkpoints call it `weight_scale_inv`);
- `input_scale` float32 [1]: a checkpoint's calibrated activation scale (static schemes only;
  otherwise activations are scaled per token, or per token and block column, at run time);
- `bias` in the model's dtype.

Every scale has the weight's output dimension first, so a tensor-parallel split of the weight's
rows (column parallel) splits the scales' rows with it, and a split of its columns (row
parallel) keeps them, block scales split along K at block boundaries (`shard`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import ClassVar

import torch
from torch import nn

import compiled_llm.kernels  # noqa: F401  (registers the ops)
from compiled_llm.kernels.fp8 import FP8_DTYPE, fp8_linear, quantize_weight
from compiled_llm.quantization.base import QuantizationMethod, eligible_linears, replace_module


class Fp8Linear(nn.Module):
    """`y = x @ dequant(weight).T + bias` through `kernels.fp8.fp8_linear`: activations are
    quantized to E4M3 too, and the GEMM multiplies FP8 operands."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        block_size: tuple[int, int] | None = None,
        static_input_scale: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,  # of the bias (and the outputs: the input's dtype)
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
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
        """`linear`'s float weight quantized (per output channel, or per block)."""
        w = linear.weight.detach()
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            block_size,
            device=w.device,
            dtype=linear.bias.dtype if linear.bias is not None else w.dtype,
        )
        q, scale = quantize_weight(w, block_size)
        layer.weight.data, layer.weight_scale.data = q, scale
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach()  # type: ignore[union-attr]
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(
            x, self.weight, self.weight_scale, self.bias, self.block_size, self.input_scale
        )

    def shard(self, dim: int, rank: int, world_size: int) -> Fp8Linear:
        """This layer's part on `rank` of `world_size` tensor-parallel ranks: output rows
        (`dim=0`, column parallel: the outputs concatenate) or input columns (`dim=1`, row
        parallel: the outputs sum; the bias stays on rank 0). Scales go with their rows or
        columns; a split must fall on block boundaries."""
        if dim not in (0, 1):
            raise ValueError(f"dim must be 0 (output rows) or 1 (input columns), got {dim}")
        size = self.weight.shape[dim]
        block = self.block_size[dim] if self.block_size else 1
        if size % world_size or (size // world_size) % block:
            raise ValueError(
                f"cannot split {size} {'rows' if dim == 0 else 'columns'} into {world_size} "
                f"parts{f' of whole {block}-wide blocks' if block > 1 else ''}"
            )
        part = size // world_size
        lo = rank * part
        scale: torch.Tensor = self.weight_scale.detach()
        if dim == 0:
            scale = scale[lo // block : (lo + part) // block]  # block is 1 per channel
        elif self.block_size:
            scale = scale[:, lo // block : (lo + part) // block]
        out_features = part if dim == 0 else self.out_features
        in_features = part if dim == 1 else self.in_features
        bias = self.bias is not None and (dim == 0 or rank == 0)
        shard = Fp8Linear(
            in_features,
            out_features,
            bias,
            tuple(self.block_size) if self.block_size else None,  # type: ignore[arg-type]
            self.input_scale is not None,
            device=self.weight.device,
            dtype=self.bias.dtype if self.bias is not None else None,
        )
        shard.weight.data = self.weight.narrow(dim, lo, part).contiguous()
        shard.weight_scale.data = scale.contiguous()
        if shard.input_scale is not None and self.input_scale is not None:
            shard.input_scale.data = self.input_scale.data.clone()
        if shard.bias is not None and self.bias is not None:
            b = self.bias.narrow(0, lo, part) if dim == 0 else self.bias
            shard.bias.data = b.contiguous()
        return shard

    def extra_repr(self) -> str:
        scales = f"block={self.block_size}" if self.block_size else "per_channel"
        static = ", static_input_scale" if self.input_scale is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {scales}{static}"
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
            )
            replace_module(model, name, layer)
        return len(linears)

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
