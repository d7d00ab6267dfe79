"""Which kernel serves a per-channel FP8 GEMM of a given shape: a table tuned per GPU.

At decode sizes a GEMM only streams its weight, and which kernel streams it fastest depends on
the shape (N, K) and the token count M: cuBLASLt's scaled GEMM, our Triton GEMM with some tiles,
or our Triton GEMV (one token). No single threshold serves every shape (on the H200, Triton's
GEMM wins gate/up up to 64 tokens and loses q/k/v at one), so the choice is measured per shape
and stored, as vLLM ships its tuned Triton configs per device:

  compiled_llm/kernels/configs/fp8_gemm-<device name>.json   written by
  python benchmarks/fp8_gemm.py --tune --shape llama-3.1-8b

A table maps "N,K" to entries sorted by `max_tokens`; a GEMM of M tokens takes the first entry
with M <= max_tokens: {"max_tokens": 4, "kernel": "triton", "block_m": 16, "block_n": 32,
"block_k": 256, "num_warps": 4, "num_stages": 4}, or {"kernel": "cublas"}. Shapes and token
counts the table does not cover (and GPUs without a table) keep the defaults of
kernels/fp8.py: cuBLASLt where it fits, else Triton's default tiles.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from compiled_llm.kernels.triton_fp8 import Tiles

CONFIG_DIR = Path(__file__).with_name("configs")
KERNELS = ("cublas", "triton", "gemv")


@dataclass(frozen=True)
class Choice:
    max_tokens: int
    kernel: Literal["cublas", "triton", "gemv"]
    tiles: Tiles | None  # None for cublas


def table_path(device_name: str) -> Path:
    return CONFIG_DIR / f"fp8_gemm-{re.sub(r'[^A-Za-z0-9]+', '_', device_name)}.json"


def parse_entry(entry: dict, where: str) -> Choice:
    kernel = entry.get("kernel")
    if kernel not in KERNELS:
        raise ValueError(f"{where}: kernel must be one of {KERNELS}, got {kernel!r}")
    max_tokens = int(entry["max_tokens"])
    if kernel == "cublas":
        return Choice(max_tokens, "cublas", None)
    if kernel == "gemv" and max_tokens != 1:
        raise ValueError(f"{where}: the GEMV serves one token, got max_tokens={max_tokens}")
    tiles = Tiles(
        block_m=int(entry.get("block_m", 1)),
        block_n=int(entry["block_n"]),
        block_k=int(entry["block_k"]),
        num_warps=int(entry.get("num_warps", 4)),
        num_stages=int(entry.get("num_stages", 3)),
        gemv=kernel == "gemv",
        split_k=int(entry.get("split_k", 1)),
    )
    return Choice(max_tokens, kernel, tiles)


def parse_table(data: dict, where: str) -> dict[tuple[int, int], tuple[Choice, ...]]:
    table = {}
    for key, entries in data.get("shapes", {}).items():
        n, k = (int(v) for v in key.split(","))
        choices = [parse_entry(e, f"{where} [{key}]") for e in entries]
        table[(n, k)] = tuple(sorted(choices, key=lambda c: c.max_tokens))
    return table


@functools.cache
def load_table(device_name: str) -> dict[tuple[int, int], tuple[Choice, ...]]:
    """The tuned table of this GPU model ({} if none ships); read once per process."""
    path = table_path(device_name)
    if not path.is_file():
        return {}
    return parse_table(json.loads(path.read_text()), str(path))


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def choose(n: int, k: int, m: int, device: torch.device) -> Choice | None:
    """The tuned kernel for an M x K by N x K per-channel FP8 GEMM on `device`, or None."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    for choice in load_table(_device_name(index)).get((n, k), ()):
        if m <= choice.max_tokens:
            return choice
    return None


def candidate_tiles(m: int) -> list[Tiles]:
    """The tiles `benchmarks/fp8_gemm.py --tune` tries for M = m tokens: the GEMM's (narrow N
    tiles or split K give more programs to stream a weight with; split K writes and re-reads
    float32 partial tiles), and at one token also the GEMV's, split or not."""
    block_m = min(64, max(16, 1 << (m - 1).bit_length()))
    out = [
        Tiles(block_m, bn, bk, num_warps=4, num_stages=stages)
        for bn in (16, 32, 64, 128)
        for bk in (128, 256)
        for stages in (3, 5)
    ]
    if m <= 16:  # split K: more programs for the narrow projections (q/k/v, o, down)
        out += [
            Tiles(block_m, bn, 128, num_warps=4, num_stages=stages, split_k=split)
            for bn in (32, 64)
            for split in (2, 4)
            for stages in (3, 5)
        ]
    if m == 1:
        out += [
            Tiles(1, bn, bk, num_warps=warps, gemv=True)
            for bn in (16, 32, 64)
            for bk in (256, 512, 1024)
            for warps in (4, 8)
        ]
        out += [
            Tiles(1, bn, bk, num_warps=4, gemv=True, split_k=split)
            for bn in (32, 64)
            for bk in (256, 512)
            for split in (2, 4)
        ]
    return out
