"""FP8 (E4M3) quantization and the scaled GEMM of an FP8 linear layer.

An FP8 linear is two ops in the graph, so compiler passes can fuse the first into the op that
produces its input (passes/fuse_norm_quant.py, passes/fuse_act_quant.py):

- `quant_fp8_per_token(x) -> (q, scale [M, 1])`: dynamic, one scale per row (token);
  `quant_fp8_per_group(x, group) -> (q, scale [M, ceil(K / group)])`: one per `group` columns
  of a row (the activations of 128x128 block-quantized weights); `quant_fp8_static(x, scale) ->
  q`: one calibrated scale from the checkpoint.
- `fp8_scaled_mm(a, a_scale, b, b_scale, block_size, bias, out_dtype) = dequant(a) @ dequant(b).T
  + bias`: `b` is the weight [N, K]; `block_size` is [] for one scale per output channel
  (`b_scale` [N, 1]) or [bn, bk] for a scale per bn x bk block (`b_scale`
  [ceil(N / bn), ceil(K / bk)], and then `a_scale` [M, ceil(K / bk)]).

Scales are dequantization multipliers in float32 (`x ~= q * scale`), as in checkpoints. Every
implementation computes them the same way: scale = max(amax / 448, MIN_SCALE) and q =
clamp(x / scale, -448, 448) rounded to the nearest E4M3 value, all in float32.

CPU implementations are the reference: they dequantize both operands to float32 and multiply
there (the products of E4M3 values are exact in float32, so this is what a GPU's FP8 tensor-core
GEMM with float32 accumulation computes, up to the order of the sums) — slow, and the oracle of
the CUDA ones. CUDA: the quantizers, a block-scaled GEMM and a one-token GEMV in Triton
(triton_fp8.py); the per-channel GEMM through whichever kernel the GPU's tuned table picks for
the shape and token count (fp8_tuning.py), else cuBLASLt (`torch._scaled_mm` with row-wise
scales) for bfloat16 output.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite E4M3 value
MIN_SCALE = 1e-12  # an all-zero row still gets a finite scale

_LIB = torch.library.Library("compiled_llm", "FRAGMENT")
_LIB.define("quant_fp8_per_token(Tensor x) -> (Tensor, Tensor)")
_LIB.define("quant_fp8_per_group(Tensor x, int group_size) -> (Tensor, Tensor)")
_LIB.define("quant_fp8_static(Tensor x, Tensor scale) -> Tensor")
_LIB.define(
    "fp8_scaled_mm(Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, int[] block_size, "
    "Tensor? bias, ScalarType out_dtype) -> Tensor"
)


# --- the reference (plain PyTorch, float32) ------------------------------------------------------
def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale rounded to E4M3 (scale broadcast against x), in float32 as every path does."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def amax_scale(amax: torch.Tensor) -> torch.Tensor:
    """The dequantization scale that maps `amax` to the largest E4M3 value."""
    return (amax.float() / FP8_MAX).clamp(min=MIN_SCALE)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = amax_scale(x.abs().amax(dim=-1, keepdim=True))
    return quantize(x, scale), scale


def quantize_per_group(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per `group_size` columns of each row (a shorter last group where K is not a
    multiple of it)."""
    m, k = x.shape
    groups = -(-k // group_size)
    padded = torch.nn.functional.pad(x.float(), (0, groups * group_size - k))
    scale = amax_scale(padded.view(m, groups, group_size).abs().amax(dim=-1))
    return quantize(x, expand_scale(scale, (m, k), (1, group_size))), scale


def quantize_weight(
    w: torch.Tensor, block_size: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [N, K] in E4M3 with one scale per output channel ([N, 1]) or per block
    ([ceil(N / bn), ceil(K / bk)])."""
    if block_size is None:
        return quantize_per_token(w)  # a row of the weight is an output channel
    n, k = w.shape
    bn, bk = block_size
    rows, cols = -(-n // bn), -(-k // bk)
    padded = torch.nn.functional.pad(w.float(), (0, cols * bk - k, 0, rows * bn - n))
    amax = padded.view(rows, bn, cols, bk).abs().amax(dim=(1, 3))
    scale = amax_scale(amax)
    return quantize(w, expand_scale(scale, (n, k), block_size)), scale


def expand_scale(
    scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]
) -> torch.Tensor:
    """A [ceil(R / br), ceil(C / bc)] block scale repeated to cover [R, C]."""
    rows, cols = shape
    return scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None = None
) -> torch.Tensor:
    """q * scale in float32; `block` for a block scale, else the scale broadcasts."""
    if block is None:
        return q.float() * scale
    return q.float() * expand_scale(scale, (q.shape[0], q.shape[1]), block)


def scaled_mm_reference(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    block_size: list[int],
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    _check_mm(a, a_scale, b, b_scale, block_size, bias)
    if block_size:
        bn, bk = block_size
        a_deq = dequantize(a, a_scale, (1, bk))
        b_deq = dequantize(b, b_scale, (bn, bk))
    else:
        a_deq, b_deq = dequantize(a, a_scale), dequantize(b, b_scale)
    y = a_deq @ b_deq.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


# --- checks and fakes ----------------------------------------------------------------------------
def _check_mm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    block_size: list[int],
    bias: torch.Tensor | None,
) -> None:
    if a.dtype != FP8_DTYPE or b.dtype != FP8_DTYPE:
        raise ValueError(f"a and b must be {FP8_DTYPE}, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a [M, K] and b [N, K] expected, got {tuple(a.shape)}, {tuple(b.shape)}")
    m, k = a.shape
    n = b.shape[0]
    if block_size:
        if len(block_size) != 2:
            raise ValueError(f"block_size must be [] or [bn, bk], got {block_size}")
        bn, bk = block_size
        want_b, want_a = (-(-n // bn), -(-k // bk)), [(m, -(-k // bk))]
    else:
        want_b, want_a = (n, 1), [(m, 1), (1, 1)]
    if tuple(b_scale.shape) != want_b:
        raise ValueError(f"b_scale has shape {tuple(b_scale.shape)}, expected {want_b}")
    if tuple(a_scale.shape) not in want_a:
        raise ValueError(f"a_scale has shape {tuple(a_scale.shape)}, expected one of {want_a}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({n},)")


@torch.library.register_fake("compiled_llm::quant_fp8_per_token", lib=_LIB)
def _per_token_fake(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape, dtype=FP8_DTYPE), x.new_empty((x.shape[0], 1), dtype=torch.float32)


@torch.library.register_fake("compiled_llm::quant_fp8_per_group", lib=_LIB)
def _per_group_fake(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    groups = -(-x.shape[1] // group_size)
    scale = x.new_empty((x.shape[0], groups), dtype=torch.float32)
    return x.new_empty(x.shape, dtype=FP8_DTYPE), scale


@torch.library.register_fake("compiled_llm::quant_fp8_static", lib=_LIB)
def _static_fake(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=FP8_DTYPE)


@torch.library.register_fake("compiled_llm::fp8_scaled_mm", lib=_LIB)
def _scaled_mm_fake(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    block_size: list[int],
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


# --- CPU: the reference --------------------------------------------------------------------------
def _check_2d(x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [tokens, features], got {tuple(x.shape)}")


def _per_token_cpu(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_2d(x)
    return quantize_per_token(x)


def _per_group_cpu(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check_2d(x)
    return quantize_per_group(x, group_size)


def _static_cpu(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    _check_2d(x)
    return quantize(x, scale.reshape(()))


_LIB.impl("quant_fp8_per_token", _per_token_cpu, "CPU")
_LIB.impl("quant_fp8_per_group", _per_group_cpu, "CPU")
_LIB.impl("quant_fp8_static", _static_cpu, "CPU")
_LIB.impl("fp8_scaled_mm", scaled_mm_reference, "CPU")


# --- CUDA ----------------------------------------------------------------------------------------
def _per_token_cuda(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from compiled_llm.kernels.triton_fp8 import quant_per_group

    _check_2d(x)
    return quant_per_group(x, x.shape[1])


def _per_group_cuda(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from compiled_llm.kernels.triton_fp8 import quant_per_group

    _check_2d(x)
    return quant_per_group(x, group_size)


def _static_cuda(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    from compiled_llm.kernels.triton_fp8 import quant_static

    _check_2d(x)
    return quant_static(x, scale)


def cublas_fits(m: int, n: int, k: int, out_dtype: torch.dtype) -> bool:
    """Shapes and dtypes cuBLASLt's row-wise scaled FP8 GEMM takes (operand leading dimensions
    16-byte aligned, bfloat16 output). Others go to the Triton kernels."""
    return out_dtype == torch.bfloat16 and k % 16 == 0 and n % 16 == 0 and m > 0


def _scaled_mm_cuda(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    block_size: list[int],
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    from compiled_llm.kernels.fp8_tuning import choose
    from compiled_llm.kernels.triton_fp8 import scaled_mm

    _check_mm(a, a_scale, b, b_scale, block_size, bias)
    m, k = a.shape
    n = b.shape[0]
    choice = None if block_size else choose(n, k, m, a.device)
    if choice is not None and choice.tiles is not None:
        return scaled_mm(a, a_scale, b, b_scale, block_size, bias, out_dtype, choice.tiles)
    if not block_size and cublas_fits(m, n, k, out_dtype) and a.is_contiguous():
        y = torch._scaled_mm(
            a,
            b.t(),  # [K, N] column-major, as cuBLASLt wants the second operand
            scale_a=a_scale.expand(m, 1).contiguous(),
            scale_b=b_scale.view(1, n),
            out_dtype=out_dtype,
        )
        return y if bias is None else y + bias
    return scaled_mm(a, a_scale, b, b_scale, block_size, bias, out_dtype)


_LIB.impl("quant_fp8_per_token", _per_token_cuda, "CUDA")
_LIB.impl("quant_fp8_per_group", _per_group_cuda, "CUDA")
_LIB.impl("quant_fp8_static", _static_cuda, "CUDA")
_LIB.impl("fp8_scaled_mm", _scaled_mm_cuda, "CUDA")


# --- the linear layer as the graph sees it -------------------------------------------------------
def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    block_size: list[int],
    input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x @ W.T + bias` with W in E4M3: quantize x (per token, per group of the weight's block
    width, or with the checkpoint's static scale), then the scaled GEMM; output in x's dtype."""
    k = x.shape[-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    ops = torch.ops.compiled_llm
    if input_scale is not None:
        q, scale = ops.quant_fp8_static.default(x2, input_scale), input_scale.view(1, 1)
    elif block_size:
        q, scale = ops.quant_fp8_per_group.default(x2, block_size[1])
    else:
        q, scale = ops.quant_fp8_per_token.default(x2)
    y = ops.fp8_scaled_mm.default(q, scale, weight, weight_scale, block_size, bias, x.dtype)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])
