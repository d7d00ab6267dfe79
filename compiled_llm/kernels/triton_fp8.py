"""Triton FP8 kernels: dynamic per-group (per-token when the group is the whole row) and static
activation quantization, an FP8 GEMM with per-channel or block scales, and a GEMV for one
token.

Quantization follows kernels/fp8.py exactly: scale = max(amax / 448, MIN_SCALE) in float32 and
q = clamp(x / scale) with a correctly rounded division (`div_rn`), so it equals the reference
bit for bit.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from compiled_llm.kernels.fp8 import FP8_DTYPE, FP8_MAX, MIN_SCALE
from compiled_llm.kernels.pdl import launch_options, wait_for_previous
from compiled_llm.kernels.split_locks import last_to_arrive, release

# Globals a kernel reads must be constexprs.
_FP8_MAX = tl.constexpr(FP8_MAX)
_MIN_SCALE = tl.constexpr(MIN_SCALE)


@triton.jit
def _quant_group_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    stride_x,
    stride_q,
    stride_s,
    n_cols,
    group_size,
    BLOCK: tl.constexpr,
    SINGLE: tl.constexpr,  # the group fits one BLOCK: read x once
    USE_PDL: tl.constexpr,
):
    wait_for_previous(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    start = group * group_size
    end = tl.minimum(start + group_size, n_cols)
    cols = tl.arange(0, BLOCK)
    if SINGLE:
        mask = start + cols < end
        x = tl.load(x_ptr + row * stride_x + start + cols, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=0)
    else:
        amax = tl.max(tl.zeros([BLOCK], dtype=tl.float32), axis=0)  # a float32 scalar
        for c in range(start, end, BLOCK):
            mask = c + cols < end
            x = tl.load(x_ptr + row * stride_x + c + cols, mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=0))
    # div_rn: Triton's `/` on float32 is approximate, the reference's division is not.
    scale = tl.maximum(tl.math.div_rn(amax, _FP8_MAX), _MIN_SCALE)
    tl.store(s_ptr + row * stride_s + group, scale)
    if SINGLE:
        q = tl.clamp(tl.math.div_rn(x, scale), -_FP8_MAX, _FP8_MAX)
        tl.store(q_ptr + row * stride_q + start + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    else:
        for c in range(start, end, BLOCK):
            mask = c + cols < end
            x = tl.load(x_ptr + row * stride_x + c + cols, mask=mask, other=0.0).to(tl.float32)
            q = tl.clamp(tl.math.div_rn(x, scale), -_FP8_MAX, _FP8_MAX)
            tl.store(q_ptr + row * stride_q + c + cols, q.to(q_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _quant_static_kernel(
    x_ptr, q_ptr, s_ptr, stride_x, stride_q, n_cols, BLOCK: tl.constexpr, USE_PDL: tl.constexpr
):
    wait_for_previous(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    scale = tl.load(s_ptr).to(tl.float32)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    q = tl.clamp(tl.math.div_rn(x, scale), -_FP8_MAX, _FP8_MAX)
    tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def quant_per_group(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale [M, ceil(K / group_size)]) of x [M, K]."""
    m, k = x.shape
    groups = triton.cdiv(k, group_size)
    q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((m, groups), dtype=torch.float32, device=x.device)
    if m == 0 or k == 0:
        return q, scale
    x = _rows(x)
    block = min(triton.next_power_of_2(group_size), 4096)
    _quant_group_kernel[(m, groups)](
        x,
        q,
        scale,
        x.stride(0),
        q.stride(0),
        scale.stride(0),
        k,
        group_size,
        BLOCK=block,
        SINGLE=group_size <= block,
        num_warps=min(max(block // 256, 1), 8),
        **launch_options(x.device),
    )
    return q, scale


def quant_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    m, k = x.shape
    q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    if m == 0 or k == 0:
        return q
    x = _rows(x)
    block = min(triton.next_power_of_2(k), 1024)
    _quant_static_kernel[(m, triton.cdiv(k, block))](
        x,
        q,
        scale,
        x.stride(0),
        q.stride(0),
        k,
        BLOCK=block,
        num_warps=4,
        **launch_options(x.device),
    )
    return q


# --- split K -------------------------------------------------------------------------------------
# A GEMM whose N alone gives too few programs to stream its weight splits K over SPLIT_K
# programs per output tile. Each stores its float32 partial tile in a workspace [SPLIT_K, M, N];
# the last of a tile's programs to finish sums them, adds the bias and writes C
# (kernels/split_locks.py).
MAX_SPLIT_TILES = 1 << 16  # output tiles a split-K launch may have (its locks)


@functools.cache
def _split_locks(device: torch.device) -> torch.Tensor:
    """The tile locks of split-K launches on `device` (kernels/split_locks.py). Never freed:
    CUDA graphs hold its address."""
    return torch.zeros(MAX_SPLIT_TILES, dtype=torch.int32, device=device)


@triton.jit
def _write_tile(
    acc,
    bias,
    c_ptrs,
    ws_ptrs,
    split_stride,
    mask,
    lock_ptr,
    pid_k,
    SPLIT_K: tl.constexpr,
):
    """C = acc + bias for this program's tile; with SPLIT_K > 1 the sum over the tile's splits,
    in split order, by the last of them. `bias` broadcasts against acc (zeros without one)."""
    if SPLIT_K == 1:
        tl.store(c_ptrs, (acc + bias).to(c_ptrs.dtype.element_ty), mask=mask)
    else:
        tl.store(ws_ptrs + pid_k * split_stride, acc, mask=mask)
        if last_to_arrive(lock_ptr, SPLIT_K):
            total = tl.load(ws_ptrs, mask=mask, other=0.0)
            for s in tl.static_range(1, SPLIT_K):
                total += tl.load(ws_ptrs + s * split_stride, mask=mask, other=0.0)
            tl.store(c_ptrs, (total + bias).to(c_ptrs.dtype.element_ty), mask=mask)
            release(lock_ptr)


# Per-step ints unspecialized: one compile for all batches, no JIT stall mid-run.
@triton.jit(do_not_specialize=["M"])
def _fp8_gemm_kernel(
    a_ptr,
    as_ptr,
    b_ptr,
    bs_ptr,
    bias_ptr,
    c_ptr,
    ws_ptr,  # split K: float32 [SPLIT_K, M, N] partials
    lock_ptr,  # split K: one int32 lock per output tile, zero
    M,
    N,
    K,
    stride_am,
    stride_bn,
    stride_cm,
    stride_asm,  # 0 where one activation scale serves every row (static)
    stride_bsn,
    scale_block_n,  # rows of b per b_scale row (1: per channel)
    scale_block_k,  # columns of a and b per scale column (only with BLOCKWISE)
    k_per_split,  # columns of K each split sums (a multiple of BK; K with SPLIT_K = 1)
    BLOCKWISE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SPLIT_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """C [M, N] = dequant(A [M, K]) @ dequant(B [N, K]).T (+ bias), float32 accumulation. With
    BLOCKWISE, the partial product of each BK-wide slice is scaled by its block's scales (BK
    divides scale_block_k, so a slice lies in one block); else scales apply once at the end.
    With SPLIT_K > 1, program (m, n, s) sums columns [s * k_per_split, (s + 1) * k_per_split)
    and the last of a tile's programs to finish writes the tile (`_write_tile`)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    b_cols = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    wait_for_previous(USE_PDL)  # A is the previous kernel's output; C may still be read
    for k0 in range(k_start, k_end, BK):
        k = k0 + offs_k
        a = tl.load(a_rows + k[None, :], mask=mask_m[:, None] & (k[None, :] < k_end), other=0.0)
        b = tl.load(b_cols + k[:, None], mask=(k[:, None] < k_end) & mask_n[None, :], other=0.0)
        if BLOCKWISE:
            kb = k0 // scale_block_k
            sa = tl.load(as_ptr + offs_m * stride_asm + kb, mask=mask_m, other=0.0)
            sb = tl.load(
                bs_ptr + (offs_n // scale_block_n) * stride_bsn + kb, mask=mask_n, other=0.0
            )
            acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
        else:
            acc += tl.dot(a, b)
    if not BLOCKWISE:
        sa = tl.load(as_ptr + offs_m * stride_asm, mask=mask_m, other=0.0)
        sb = tl.load(bs_ptr + offs_n * stride_bsn, mask=mask_n, other=0.0)
        acc = acc * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BN,), dtype=tl.float32)
    rows = offs_m.to(tl.int64)[:, None]
    _write_tile(
        acc,
        bias[None, :],
        c_ptr + rows * stride_cm + offs_n[None, :],
        ws_ptr + rows * N + offs_n[None, :],
        M.to(tl.int64) * N,
        mask_m[:, None] & mask_n[None, :],
        lock_ptr + pid_m * tl.num_programs(1) + pid_n,
        pid_k,
        SPLIT_K,
    )


@triton.jit
def _fp8_gemv_kernel(
    a_ptr,
    as_ptr,
    b_ptr,
    bs_ptr,
    bias_ptr,
    c_ptr,
    ws_ptr,  # split K: float32 [SPLIT_K, N] partials
    lock_ptr,  # split K: one int32 lock per output tile, zero
    N,
    K,
    stride_bn,
    stride_bsn,
    scale_block_n,
    scale_block_k,
    k_per_split,  # as in the GEMM
    BLOCKWISE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SPLIT_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """One token (M = 1): c [N] = dequant(a [K]) . dequant(B [N, K]) rows, without tensor
    cores (which would waste 15 of their 16 rows), streaming B in [BN, BK] tiles, each tile
    loaded one step ahead of its use: the first before waiting for the previous kernel (B is a
    weight, which no kernel writes). Split K as in the GEMM."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    mask_n = offs_n < N
    b_rows = b_ptr + offs_n.to(tl.int64)[:, None] * stride_bn
    k = k_start + offs_k
    b = tl.load(b_rows + k[None, :], mask=mask_n[:, None] & (k[None, :] < k_end), other=0.0)
    wait_for_previous(USE_PDL)
    acc = tl.zeros((BN,), dtype=tl.float32)
    for k0 in range(k_start, k_end, BK):
        k = k0 + offs_k
        a = tl.load(a_ptr + k, mask=k < k_end, other=0.0).to(tl.float32)
        kn = k + BK
        b_next = tl.load(
            b_rows + kn[None, :], mask=mask_n[:, None] & (kn[None, :] < k_end), other=0.0
        )
        part = tl.sum(b.to(tl.float32) * a[None, :], axis=1)
        if BLOCKWISE:
            kb = k0 // scale_block_k
            sb = tl.load(
                bs_ptr + (offs_n // scale_block_n) * stride_bsn + kb, mask=mask_n, other=0.0
            )
            acc += part * tl.load(as_ptr + kb) * sb
        else:
            acc += part
        b = b_next
    if not BLOCKWISE:
        acc = acc * tl.load(as_ptr) * tl.load(bs_ptr + offs_n * stride_bsn, mask=mask_n, other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BN,), dtype=tl.float32)
    _write_tile(
        acc, bias, c_ptr + offs_n, ws_ptr + offs_n, N, mask_n, lock_ptr + pid_n, pid_k, SPLIT_K
    )


@dataclass(frozen=True)
class Tiles:
    """Launch parameters of the FP8 GEMM kernel, or of the one-token GEMV with `gemv` (which
    ignores `block_m`). `block_k` must divide a block-scaled weight's block width. Chosen per
    shape by kernels/fp8_tuning.py, or by `default_tiles`."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    gemv: bool = False
    split_k: int = 1  # K split over this many programs per output tile


def default_tiles(m: int, scale_block_k: int | None) -> Tiles:
    """Tiles for shapes no tuned table covers: the GEMV for one token; otherwise small-M tiles
    for decode (tl.dot needs 16 rows; narrow N tiles give more programs to stream the weight
    with), larger ones for prefill."""
    bk = 128
    if scale_block_k is not None:
        while scale_block_k % bk:
            bk //= 2
        bk = max(bk, 16)
    if m == 1:
        return Tiles(1, 32, bk, num_warps=4, gemv=True)
    if m <= 16:
        return Tiles(16, 64, bk)
    if m <= 64:
        return Tiles(64, 64, bk)
    return Tiles(128, 128, bk, num_warps=8)


def scaled_mm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    block_size: list[int],
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    tiles: Tiles | None = None,
) -> torch.Tensor:
    """compiled_llm::fp8_scaled_mm in Triton (shapes checked by the caller), with `tiles` or
    `default_tiles`; the GEMV kernel where `tiles.gemv` (one token only)."""
    m, k = a.shape
    n = b.shape[0]
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    a, b = _rows(a), _rows(b)
    a_scale = a_scale.contiguous()
    b_scale = b_scale.contiguous()
    blockwise = bool(block_size)
    bn_scale, bk_scale = (block_size[0], block_size[1]) if blockwise else (1, k)
    if blockwise and bk_scale % 16:
        raise ValueError(f"the Triton FP8 GEMM needs block widths divisible by 16, got {bk_scale}")
    t = tiles or default_tiles(m, bk_scale if blockwise else None)
    if blockwise and bk_scale % t.block_k:
        raise ValueError(f"block_k {t.block_k} does not divide the scale block width {bk_scale}")
    if t.gemv and m != 1:
        raise ValueError(f"the FP8 GEMV takes one token, got {m}")
    grid_m = 1 if t.gemv else triton.cdiv(m, t.block_m)
    grid_n = triton.cdiv(n, t.block_n)
    # Split K in whole BK steps; fewer splits where K has too few of them for the ones asked.
    k_per_split = triton.cdiv(triton.cdiv(k, t.split_k), t.block_k) * t.block_k
    splits = triton.cdiv(k, k_per_split)
    if grid_m * grid_n > MAX_SPLIT_TILES:  # more tiles than locks: no split (never in decode)
        k_per_split, splits = k, 1
    if splits > 1:
        ws = torch.empty((splits, m, n), dtype=torch.float32, device=a.device)
        locks = _split_locks(a.device)
    else:
        ws = locks = c  # unused
    common = dict(
        BLOCKWISE=blockwise,
        HAS_BIAS=bias is not None,
        BN=t.block_n,
        BK=t.block_k,
        SPLIT_K=splits,
        num_warps=t.num_warps,
        num_stages=t.num_stages,
        **launch_options(a.device),
    )
    bias_arg = bias if bias is not None else c
    if t.gemv:
        _fp8_gemv_kernel[(grid_n, splits)](
            a,
            a_scale,
            b,
            b_scale,
            bias_arg,
            c,
            ws,
            locks,
            n,
            k,
            b.stride(0),
            b_scale.stride(0),
            bn_scale,
            bk_scale,
            k_per_split,
            **common,
        )
        return c
    stride_asm = a_scale.stride(0) if a_scale.shape[0] == m and m > 1 else 0
    _fp8_gemm_kernel[(grid_m, grid_n, splits)](
        a,
        a_scale,
        b,
        b_scale,
        bias_arg,
        c,
        ws,
        locks,
        m,
        n,
        k,
        a.stride(0),
        b.stride(0),
        c.stride(0),
        stride_asm,
        b_scale.stride(0),
        bn_scale,
        bk_scale,
        k_per_split,
        BM=t.block_m,
        **common,
    )
    return c
