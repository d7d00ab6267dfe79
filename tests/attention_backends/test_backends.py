"""Every GPU attention backend against the torch reference on ragged paged batches.

Outputs are poisoned with NaN first and every real row must be written; caches must match the
reference's bit for bit after the KV write. Block tables are random permutations of the pool
(non-contiguous pages) and unused table entries point at a page full of NaN, so a kernel that
reads past a sequence's end fails loudly. CPU CI runs the Triton kernels under TRITON_INTERPRET=1
in one subprocess (the variable must be set before triton is imported, which this pytest process
may already have done); the GPU cases are marked `gpu`.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch

from compiled_llm.attention_backends.base import AttentionBackend, AttentionInputs, AttentionSpec
from compiled_llm.attention_backends.torch_ref import TorchAttentionBackend

CUDA = torch.cuda.is_available()
HAS_FLASHINFER = CUDA and importlib.util.find_spec("flashinfer") is not None
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@dataclass(frozen=True)
class Case:
    name: str
    seq_lens: tuple[int, ...]
    query_lens: tuple[int, ...]
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 128
    block_size: int = 16
    dtype: torch.dtype = torch.bfloat16
    pad_tokens: int = 0  # extra query rows with slot -1, as a captured batch has


def make_inputs(case: Case, device: torch.device, gen: torch.Generator) -> AttentionInputs:
    """A packed batch over random pages; the last pool page (NaN) fills unused table entries."""
    bs, r = case.block_size, len(case.seq_lens)
    pages = [-(-s // bs) for s in case.seq_lens]
    num_blocks = sum(pages) + 5
    perm = torch.randperm(num_blocks - 1, generator=gen).to(torch.int32)
    table = torch.full((r, max(pages) + 3), num_blocks - 1, dtype=torch.int32)
    used = 0
    for i, p in enumerate(pages):
        table[i, :p] = perm[used : used + p]
        used += p
    inputs, _ = AttentionInputs.from_batch(
        np.array(case.query_lens),
        np.array(case.seq_lens),
        table.numpy(),
        bs,
        device,
        num_padded_tokens=sum(case.query_lens) + case.pad_tokens,
    )
    return inputs


def spec_of(case: Case, device: torch.device) -> AttentionSpec:
    d = case.head_dim
    return AttentionSpec(
        case.num_heads, case.num_kv_heads, d, case.block_size, case.dtype, device, d**-0.5
    )


def random_cache(case: Case, inputs: AttentionInputs, gen: torch.Generator) -> torch.Tensor:
    num_blocks = int(inputs.block_table.max()) + 1
    shape = (num_blocks, 2, case.block_size, case.num_kv_heads, case.head_dim)
    cache = torch.randn(shape, generator=gen).to(case.dtype)
    cache[-1] = float("nan")
    return cache.to(inputs.block_table.device)


def case_tensors(
    case: Case, device: torch.device, seed: int
) -> tuple[AttentionInputs, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch's inputs, its KV cache, and the q, k, v of its query rows."""
    gen = torch.Generator().manual_seed(seed)
    inputs = make_inputs(case, device, gen)
    cache = random_cache(case, inputs, gen)
    rows = inputs.slot_mapping.shape[0]
    q, k, v = (
        torch.randn(rows, h, case.head_dim, generator=gen).to(case.dtype).to(device)
        for h in (case.num_heads, case.num_kv_heads, case.num_kv_heads)
    )
    return inputs, cache, q, k, v


def compare(
    backend: AttentionBackend, case: Case, seed: int = 0, prepare: bool = False
) -> dict[str, float | bool]:
    """Write + attend with `backend` and with the reference on the same inputs."""
    device = backend.spec.device
    inputs, cache, q, k, v = case_tensors(case, device, seed)
    rows = inputs.slot_mapping.shape[0]
    results = []
    for be in (TorchAttentionBackend(backend.spec), backend):
        if prepare and be is backend:
            be.prepare_for_capture(max_num_reqs=len(case.seq_lens) + 3, max_num_tokens=rows + 8)
        kv = cache.clone()
        md = be.build_metadata(inputs)
        be.write_kv(k, v, kv, md)
        out = torch.full_like(q, float("nan"))
        be.attend(q, kv, md, out)
        results.append((kv, out[: inputs.num_tokens].float()))
    (ref_kv, ref), (kv, out) = results
    return {
        "err": ((out - ref).norm() / ref.norm()).item(),
        "written": bool(torch.isfinite(out).all()),
        "cache_equal": bool(torch.equal(ref_kv.nan_to_num(7.0), kv.nan_to_num(7.0))),
    }


def fused_rope_compare(
    backend: AttentionBackend, case: Case, seed: int = 0
) -> dict[str, float | bool]:
    """`rope_write_kv` (RoPE of q and k fused with the KV write) against the torch reference's,
    which is the model's own `apply_rotary` followed by `write_kv`. cos/sin are per-token views
    of a float32 table with a row stride of head_dim, as `RotaryEmbedding` hands them over."""
    device = backend.spec.device
    gen = torch.Generator().manual_seed(seed)
    inputs = make_inputs(case, device, gen)
    cache = random_cache(case, inputs, gen)
    rows, d = inputs.slot_mapping.shape[0], case.head_dim
    q, k, v = (
        torch.randn(rows, h, d, generator=gen).to(case.dtype).to(device)
        for h in (case.num_heads, case.num_kv_heads, case.num_kv_heads)
    )
    table = torch.randn(64, d, generator=gen)
    positions = torch.randint(0, 64, (rows,), generator=gen)
    cos, sin = table[positions].to(device).chunk(2, dim=-1)
    q0, k0 = q.clone(), k.clone()
    results = []
    for be in (TorchAttentionBackend(backend.spec), backend):
        kv = cache.clone()
        q_rot = be.rope_write_kv(q, k, v, cos, sin, kv, be.build_metadata(inputs))
        results.append((kv.nan_to_num(7.0).float(), q_rot))
    (ref_kv, ref_q), (kv, q_rot) = results
    return {
        "q_err": ((q_rot.float() - ref_q.float()).norm() / ref_q.float().norm()).item(),
        "cache_max_err": (kv - ref_kv).abs().max().item(),
        "inputs_unchanged": bool(torch.equal(q, q0) and torch.equal(k, k0)),
        "contiguous": q_rot.is_contiguous() and q_rot.shape == q.shape,
    }


def check_fused_rope(result: dict[str, float | bool], dtype: torch.dtype) -> None:
    assert result["inputs_unchanged"] and result["contiguous"]
    assert result["q_err"] <= TOLERANCE[dtype], f"rotated q: relative error {result['q_err']:.3g}"
    # Elementwise: a stray write (a padding token's slot -1) would be off by O(1).
    bound = 1e-5 if dtype == torch.float32 else 0.1
    assert result["cache_max_err"] <= bound, f"cache: max error {result['cache_max_err']:.3g}"


def test_torch_fused_rope_write_kv() -> None:
    """The reference's fused method is exactly apply_rotary + write_kv: zero error against it,
    and q, k untouched; padding rows (slot -1) are rotated but not written."""
    case = Case("fused", (9, 4), (5, 4), 4, 2, 16, 4, torch.bfloat16, pad_tokens=2)
    backend = TorchAttentionBackend(spec_of(case, torch.device("cpu")))
    result = fused_rope_compare(backend, case)
    assert result["q_err"] == 0 and result["cache_max_err"] == 0
    check_fused_rope(result, case.dtype)


def check(result: dict[str, float | bool], dtype: torch.dtype) -> None:
    assert result["written"], "output rows left unwritten (NaN poison survived)"
    assert result["cache_equal"], "KV cache differs from the reference write"
    assert result["err"] <= TOLERANCE[dtype], f"relative error {result['err']:.3g}"


# --- CPU: the Triton kernels under the interpreter ----------------------------------------------
F32 = torch.float32
INTERPRETER_CASES = [
    Case("decode_mha", (5, 40, 1, 70), (1, 1, 1, 1), 2, 2, 32, 16, F32, pad_tokens=2),
    Case("decode_gqa4", (33, 17, 64), (1, 1, 1), 8, 2, 16, 8, F32),
    Case("prefill_gqa2", (5, 40, 17), (5, 40, 17), 4, 2, 16, 16, F32),
    Case("chunked_mixed_gqa8", (40, 17, 33, 9), (9, 1, 33, 2), 8, 1, 32, 8, F32, pad_tokens=3),
    Case("prefill_group3_dim24", (21, 3), (21, 2), 6, 2, 24, 16, F32),
    Case("decode_fp16", (50, 7), (1, 1), 4, 1, 32, 16, torch.float16),
]
PREPARED_CASES = ["decode_mha", "chunked_mixed_gqa8"]  # staged buffers + split-KV path
FUSED_ROPE_CASES = [
    Case("mixed_gqa2", (40, 17, 9), (9, 1, 9), 4, 2, 32, 8, F32, pad_tokens=3),
    Case("dim24_fp16", (5, 3), (5, 1), 6, 3, 24, 16, torch.float16, pad_tokens=1),
]


def _interpreter_main() -> None:
    """Run in a subprocess with TRITON_INTERPRET=1; prints one JSON line of results."""
    from compiled_llm.attention_backends.triton_backend import TritonAttentionBackend

    cpu = torch.device("cpu")
    results: dict[str, object] = {}
    for case in INTERPRETER_CASES:
        backend = TritonAttentionBackend(spec_of(case, cpu))
        results[case.name] = compare(backend, case)
        if case.name in PREPARED_CASES:
            backend = TritonAttentionBackend(spec_of(case, cpu))
            results[case.name + "_prepared"] = compare(backend, case, prepare=True)
    results["rope"] = rope_error(cpu, torch.float32)
    for case in FUSED_ROPE_CASES:
        backend = TritonAttentionBackend(spec_of(case, cpu))
        results["fused_rope_" + case.name] = fused_rope_compare(backend, case)
    for kind in GRAPH_BATCHES:
        results["replay_" + kind] = replay_without_graph(kind)
    results["flatten_block_table"] = flatten_block_table_check(cpu)
    print(json.dumps(results))


def flatten_block_table_check(device: torch.device) -> dict[str, bool]:
    """FlashInfer's page list from `flatten_block_table` against slicing the table on the host.
    As in the FlashInfer backend, the table has rows for the real requests only and padding
    requests past them take one page each, which must be page 0 without reading the table."""
    from compiled_llm.attention_backends.triton_kernels import flatten_block_table

    gen = torch.Generator().manual_seed(4)
    counts = [3, 0, 300, 1, 1]  # 300 pages: two of the kernel's 256-page blocks
    num_reqs = 3
    table = torch.randint(1, 1000, (num_reqs, 310), generator=gen, dtype=torch.int32)
    indptr = torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int32)
    zeros = torch.zeros(max(counts), dtype=torch.int32)
    expect = torch.cat([(table[i] if i < num_reqs else zeros)[:c] for i, c in enumerate(counts)])
    total = int(indptr[-1])
    out = torch.full((total + 4,), -1, dtype=torch.int32, device=device)
    flatten_block_table(table.to(device), indptr.to(device), num_reqs, out)
    out = out.cpu()
    return {
        "equal": torch.equal(out[:total], expect),
        "rest_untouched": bool((out[total:] == -1).all()),
    }


def replay_without_graph(kind: str) -> dict[str, float | bool]:
    """What a graph replay does, on CPU: every step launches with the first step's metadata
    (grids, split counts, tensor addresses) while build_metadata refreshes the staged buffers."""
    from compiled_llm.attention_backends.triton_backend import TritonAttentionBackend

    cpu, padded = torch.device("cpu"), (8 if kind == "decode" else 32)
    base = Case("replay", (1,), (1,), 8, 2, 32, 16, torch.float32)
    spec = spec_of(base, cpu)
    be, ref_be = TritonAttentionBackend(spec), TorchAttentionBackend(spec)
    gen = torch.Generator().manual_seed(5)
    cache = be.allocate_kv_caches(256, num_layers=1)[0]
    cache.copy_(torch.randn(cache.shape, generator=gen))
    be.prepare_for_capture(max_num_reqs=16, max_num_tokens=64)
    first, worst, ok = None, 0.0, True
    for seq_lens, query_lens in GRAPH_BATCHES[kind]:
        seq = tuple(max(1, s // 64) for s in seq_lens)
        qlen = tuple(min(q, s) for q, s in zip(query_lens, seq))
        case = replace(base, seq_lens=seq, query_lens=qlen, pad_tokens=padded - sum(qlen))
        inputs = make_inputs(case, cpu, gen)
        q, k, v = (torch.randn(padded, h, 32, generator=gen) for h in (8, 2, 2))
        md = be.build_metadata(inputs)
        first = first or md
        ref_cache = cache.clone()
        be.write_kv(k, v, cache, first)
        out = torch.full_like(q, float("nan"))
        be.attend(q, cache, first, out)
        ref_md = ref_be.build_metadata(inputs)
        ref_be.write_kv(k, v, ref_cache, ref_md)
        ref = torch.full_like(q, float("nan"))
        ref_be.attend(q, ref_cache, ref_md, ref)
        n = inputs.num_tokens
        worst = max(worst, ((out[:n] - ref[:n]).norm() / ref[:n].norm()).item())
        ok = ok and bool(torch.isfinite(out[:n]).all()) and torch.equal(cache, ref_cache)
    return {"err": worst, "written": ok, "cache_equal": ok}


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, dict[str, float | bool]]:
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, __file__, "--interpreter"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    hint = ""
    if "only 0-dimensional arrays can be converted" in proc.stderr:
        hint = "\n(Triton < 3.7's interpreter needs NumPy < 2.4: triton-lang/triton#9171)"
    assert proc.returncode == 0, proc.stderr[-4000:] + hint
    return json.loads(proc.stdout.strip().splitlines()[-1])


INTERPRETER_NAMES = [c.name for c in INTERPRETER_CASES] + [n + "_prepared" for n in PREPARED_CASES]


@pytest.mark.slow
@pytest.mark.parametrize("name", INTERPRETER_NAMES)
def test_triton_interpreter(interpreter_results: dict, name: str) -> None:
    dtype = next(c.dtype for c in INTERPRETER_CASES if name.startswith(c.name))
    check(interpreter_results[name], dtype)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["decode", "mixed"])
def test_triton_interpreter_replay(interpreter_results: dict, kind: str) -> None:
    check(interpreter_results["replay_" + kind], torch.float32)


@pytest.mark.slow
def test_triton_interpreter_rope(interpreter_results: dict) -> None:
    assert interpreter_results["rope"]["q"] < 1e-5 and interpreter_results["rope"]["k"] < 1e-5
    assert interpreter_results["rope"]["cache_close"]


@pytest.mark.slow
@pytest.mark.parametrize("case", FUSED_ROPE_CASES, ids=lambda c: c.name)
def test_triton_interpreter_fused_rope(interpreter_results: dict, case: Case) -> None:
    check_fused_rope(interpreter_results["fused_rope_" + case.name], case.dtype)


@pytest.mark.slow
def test_triton_interpreter_flatten_block_table(interpreter_results: dict) -> None:
    assert interpreter_results["flatten_block_table"] == {"equal": True, "rest_untouched": True}


# --- RoPE fused with the KV write ---------------------------------------------------------------
def rope_error(device: torch.device, dtype: torch.dtype) -> dict[str, float | bool]:
    from compiled_llm.attention_backends.triton_kernels import rope_and_write_kv
    from compiled_llm.layers.rotary import apply_rotary

    gen = torch.Generator().manual_seed(3)
    t, hq, hkv, d, bs, nb = 7, 4, 2, 32, 8, 6
    q, k, v = (torch.randn(t, h, d, generator=gen).to(dtype) for h in (hq, hkv, hkv))
    positions = torch.randint(0, 50, (t,), generator=gen)
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    freqs = torch.outer(torch.arange(64).float(), inv)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1)
    slots = torch.randperm(nb * bs, generator=gen)[:t]
    slots[2] = -1
    cache = torch.randn(nb, 2, bs, hkv, d, generator=gen).to(dtype)
    cos, sin = cos_sin[positions].chunk(2, -1)
    q_ref, k_ref = apply_rotary(q.float(), cos, sin), apply_rotary(k.float(), cos, sin)
    ref_cache = cache.clone()
    keep = slots >= 0
    blk, off = slots[keep] // bs, slots[keep] % bs
    ref_cache[blk, 0, off] = k_ref[keep].to(dtype)
    ref_cache[blk, 1, off] = v[keep]
    args = (q, k, v, positions, cos_sin, cache, slots)
    q2, k2, v2, pos2, cs2, cache2, slots2 = (x.to(device) for x in args)
    rope_and_write_kv(q2, k2, v2, pos2, cs2, cache2, slots2)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.cpu().float() - b).norm() / b.norm()).item()

    return {
        "q": rel(q2, q_ref),
        "k": rel(k2, k_ref),
        "cache_close": rel(cache2, ref_cache.float()) < 1e-2,
    }


# --- GPU ----------------------------------------------------------------------------------------
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")

MODES = {
    "decode": Case("decode", (1, 17, 100, 1000, 4096, 2049, 33, 512), (1,) * 8, pad_tokens=3),
    "prefill": Case("prefill", (1, 7, 300, 1100, 2048), (1, 7, 300, 1100, 2048)),
    "chunked": Case("chunked", (4096, 1500, 900, 64, 1), (512, 1, 900, 16, 1), pad_tokens=5),
}
HEADS = [(8, 8), (16, 4), (32, 4)]  # GQA ratios 1, 4, 8


def make_backend(name: str, spec: AttentionSpec) -> AttentionBackend:
    if name == "flashinfer" and not HAS_FLASHINFER:
        pytest.skip("flashinfer is not installed")
    from compiled_llm.attention_backends.registry import get_backend_class

    return get_backend_class(name)(spec)


@gpu
@needs_cuda
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend", ["triton", "flashinfer"])
def test_matches_reference(
    backend: str, mode: str, block_size: int, heads: tuple[int, int], head_dim: int
) -> None:
    case = replace(
        MODES[mode],
        num_heads=heads[0],
        num_kv_heads=heads[1],
        head_dim=head_dim,
        block_size=block_size,
    )
    be = make_backend(backend, spec_of(case, torch.device("cuda")))
    check(compare(be, case, seed=block_size + head_dim), case.dtype)


@gpu
@needs_cuda
def test_flashinfer_split_kv_prefill_fits_workspace() -> None:
    """One 512-token prefill, 32 query heads over 4 KV heads, head_dim 128 (the Qwen3-30B-A3B
    shape's piecewise capture batch): FlashInfer splits its KV into 64 work items whose float32
    partials (128 MiB plus the log-sum-exps) overflowed the fixed 128 MiB workspace at plan."""
    case = Case("split_kv_prefill", (512,), (512,), num_heads=32, num_kv_heads=4)
    be = make_backend("flashinfer", spec_of(case, torch.device("cuda")))
    check(compare(be, case, seed=11), case.dtype)


def test_flashinfer_workspace_sizes_match_its_planner() -> None:
    """The sizes FlashInfer asked for when its plans overflowed the fixed 128 MiB (H200, 132 SMs):
    a 512-request tensor-core decode graph of the Llama-3.1-8B shape wanted 167,510,016 bytes of
    `batch_prefill_tmp_v` (639 work items of 16 query rows x 32 heads x 128 values), plus the
    log-sum-exps; the eager Qwen3-30B-A3B prefill (32 heads over 4 KV heads) 66 items of 128 rows."""
    from compiled_llm.attention_backends.flashinfer_sizing import (
        graph_workspace_bytes,
        workspace_bytes,
    )

    headroom = 16 << 20
    tmp_v, tmp_s = 167_510_016, 639 * 16 * 32 * 4
    assert graph_workspace_bytes(32, 8, 128, 132, 512, 512) == tmp_v + tmp_s + headroom
    assert workspace_bytes(32, 4, 128, 132) == 66 * 128 * 32 * 129 * 4 + headroom
    assert workspace_bytes(32, 8, 128, 132) == 128 << 20  # the floor
    # by the same rule, a verification graph (32 requests x 5 tokens): tiles of 128 rows, 36 items
    assert graph_workspace_bytes(32, 8, 128, 132, 32, 160) == 36 * 128 * 32 * 129 * 4 + headroom


@gpu
@needs_cuda
@pytest.mark.parametrize("num_reqs", [512, 1024])
def test_flashinfer_large_decode_graph_fits_workspace(num_reqs: int) -> None:
    """A CUDA-graph decode plan of 512 requests with 32 query heads over 8 KV heads (the
    Llama-3.1-8B shape, tensor-core decode) pads its work items to one per query tile of each
    request: 161 MiB of partials, more than the 128 MiB floor, and an engine with
    max_num_seqs=512 failed at its first capture (`batch_prefill_tmp_v`)."""
    lens = tuple(17 + i % 50 for i in range(num_reqs))
    case = Case("large_decode_graph", lens, (1,) * num_reqs, num_heads=32, num_kv_heads=8)
    be = make_backend("flashinfer", spec_of(case, torch.device("cuda")))
    check(compare(be, case, seed=13, prepare=True), case.dtype)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("mode", list(MODES))
def test_triton_other_dtypes(mode: str, dtype: torch.dtype) -> None:
    case = replace(MODES[mode], num_heads=16, num_kv_heads=4, dtype=dtype)
    be = make_backend("triton", spec_of(case, torch.device("cuda")))
    check(compare(be, case), dtype)


@gpu
@needs_cuda
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend", ["triton", "flashinfer"])
def test_prepared_buffers(backend: str, mode: str) -> None:
    """Staged (graph-ready) metadata, eagerly: padded request slots and fixed split counts."""
    case = replace(MODES[mode], num_heads=32, num_kv_heads=8)
    be = make_backend(backend, spec_of(case, torch.device("cuda")))
    check(compare(be, case, prepare=True), case.dtype)


@gpu
@needs_cuda
@pytest.mark.parametrize(
    "first,second",
    [
        ("decode", replace(MODES["decode"], seq_lens=(3000, 5, 700, 64, 9, 1200, 4000, 100))),
        ("prefill", MODES["chunked"]),
    ],
    ids=["decode", "prefill"],
)
def test_flashinfer_plans_while_device_is_behind(first: str, second: Case) -> None:
    """With async scheduling, step N+1 is planned while the device has not yet run step N.
    FlashInfer stages each plan in one pinned host buffer per wrapper and copies it to the device
    asynchronously: each step must still attend with its own plan."""
    cases = [replace(c, num_heads=32, num_kv_heads=8) for c in (MODES[first], second)]
    device = torch.device("cuda")
    be = make_backend("flashinfer", spec_of(cases[0], device))
    batches = [case_tensors(c, device, seed) for seed, c in enumerate(cases)]
    refs = []
    for inputs, cache, q, k, v in batches:
        ref_be = TorchAttentionBackend(be.spec)
        kv, out, md = cache.clone(), torch.empty_like(q), ref_be.build_metadata(inputs)
        ref_be.write_kv(k, v, kv, md)
        ref_be.attend(q, kv, md, out)
        refs.append(out[: inputs.num_tokens].float())

    def steps() -> list[torch.Tensor]:
        outs = []
        for inputs, cache, q, k, v in batches:
            kv, out = cache.clone(), torch.full_like(q, float("nan"))
            md = be.build_metadata(inputs)
            be.write_kv(k, v, kv, md)
            be.attend(q, kv, md, out)
            outs.append(out[: inputs.num_tokens].float())
        return outs

    steps()  # first use loads FlashInfer's kernels, which may wait for the device
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # ~0.1 s: both steps below queue behind this
    outs = steps()
    torch.cuda.synchronize()
    for out, ref in zip(outs, refs, strict=True):
        assert ((out - ref).norm() / ref.norm()).item() < TOLERANCE[torch.bfloat16]


@gpu
@needs_cuda
def test_flatten_block_table_gpu() -> None:
    result = flatten_block_table_check(torch.device("cuda"))
    assert result == {"equal": True, "rest_untouched": True}


@gpu
@needs_cuda
def test_rope_and_write_kv_gpu() -> None:
    res = rope_error(torch.device("cuda"), torch.bfloat16)
    assert res["q"] < 1e-2 and res["k"] < 1e-2 and res["cache_close"]


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend", ["triton", "flashinfer"])
def test_fused_rope_write_kv_gpu(backend: str, mode: str, dtype: torch.dtype) -> None:
    """`rope_write_kv` (the op behind the rope_kv_write pass) against apply_rotary + write_kv."""
    case = replace(MODES[mode], num_heads=32, num_kv_heads=8, dtype=dtype)
    be = make_backend(backend, spec_of(case, torch.device("cuda")))
    check_fused_rope(fused_rope_compare(be, case, seed=7), dtype)


GRAPH_BATCHES = {
    # (seq_lens, query_lens) per step; every step pads to the same token count.
    "decode": [((9, 300, 4000, 2), (1, 1, 1, 1)), ((1, 64, 2000, 17, 3000, 5), (1,) * 6)],
    "mixed": [
        ((300, 40, 2000), (20, 1, 3)),
        ((1000, 2, 7, 600, 3000), (1, 2, 7, 1, 1)),
        ((50, 60, 70), (1, 1, 1)),
    ],
}


@gpu
@needs_cuda
@pytest.mark.parametrize(
    ("backend", "kind"), [("triton", "decode"), ("triton", "mixed"), ("flashinfer", "decode")]
)
def test_cuda_graph_replay(backend: str, kind: str) -> None:
    """Capture write + attend once, then replay for other batches of the same padded size."""
    dev = torch.device("cuda")
    padded = 8 if kind == "decode" else 32
    base = Case("graph", (1,), (1,), num_heads=16, num_kv_heads=4)
    spec = spec_of(base, dev)
    be = make_backend(backend, spec)
    num_blocks = 2048
    cache = be.allocate_kv_caches(num_blocks, num_layers=1)[0]  # tells it the pool size
    be.prepare_for_capture(max_num_reqs=16, max_num_tokens=64)
    ref_be = TorchAttentionBackend(spec)
    gen = torch.Generator().manual_seed(11)
    cache.copy_(torch.randn(cache.shape, generator=gen).to(cache.dtype))
    bufs = [torch.zeros(padded, h, 128, dtype=torch.bfloat16, device=dev) for h in (16, 4, 4)]
    q_buf, k_buf, v_buf = bufs
    out_buf = torch.zeros_like(q_buf)
    graph = None
    for step, (seq_lens, query_lens) in enumerate(GRAPH_BATCHES[kind]):
        case = replace(
            base,
            seq_lens=seq_lens,
            query_lens=query_lens,
            pad_tokens=padded - sum(query_lens),
        )
        inputs = make_inputs(case, dev, gen)  # its pages all lie inside the shared pool
        for buf in bufs:
            buf.copy_(torch.randn(buf.shape, generator=gen).to(buf.dtype))
        ref_cache = cache.clone()
        md = be.build_metadata(inputs)
        if graph is None:
            be.write_kv(k_buf, v_buf, cache.clone(), md)  # warm up (compiles) outside capture
            be.attend(q_buf, cache, md, out_buf)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                be.write_kv(k_buf, v_buf, cache, md)
                be.attend(q_buf, cache, md, out_buf)
        out_buf.fill_(float("nan"))
        graph.replay()
        ref_md = ref_be.build_metadata(inputs)
        ref_be.write_kv(k_buf, v_buf, ref_cache, ref_md)
        ref = torch.full_like(q_buf, float("nan"))
        ref_be.attend(q_buf, ref_cache, ref_md, ref)
        n = inputs.num_tokens
        out, expect = out_buf[:n].float(), ref[:n].float()
        err = ((out - expect).norm() / expect.norm()).item()
        assert torch.isfinite(out).all(), f"step {step}: rows left unwritten"
        assert torch.equal(cache, ref_cache), f"step {step}: cache differs"
        assert err <= 1e-2, f"step {step}: relative error {err:.3g}"


if __name__ == "__main__" and "--interpreter" in sys.argv:
    _interpreter_main()


def _compiled_variants(kernel: object) -> int:
    """Binaries a @triton.jit function has compiled so far (its per-device kernel caches)."""
    caches = getattr(kernel, "device_caches", {})
    return sum(len(entry[0]) for entry in caches.values())


@gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "flashinfer"])
def test_kernels_compile_once_across_batches(backend: str) -> None:
    """Mid-run JIT compiles stalled the H200 throughput run by 1.4-1.9 s each (three prefill steps):
    Triton specializes int arguments on their value class (1, % 16), and the request count or
    block-table width of eager batches crosses classes from step to step. After one batch of each
    kind, batches of other request counts, token counts and table widths compile nothing new.
    Whether eager decode splits at all is a constexpr on purpose (SINGLE_SPLIT); every decode
    batch here has 2 splits (longest context 257-512 tokens, at most 66 requests), so only the
    int arguments differ."""
    from compiled_llm.attention_backends.triton_kernels import decode, kv_write, page_indices
    from compiled_llm.attention_backends.triton_kernels import prefill as prefill_kernels

    kernels = {
        "prefill": prefill_kernels._prefill_kernel,
        "decode": decode._decode_split_kernel,
        "write": kv_write._write_kv_kernel,
        "flatten": page_indices._flatten_kernel,
    }
    warm = [
        Case("mixed_warm", (40, 300, 7), (40, 1, 1), num_heads=32, num_kv_heads=8),
        Case("decode_warm", (40, 300, 7), (1, 1, 1), num_heads=32, num_kv_heads=8),
    ]
    # request counts 1, 16, 17, 33; table widths 7 to 73 entries (32 among them); odd and even
    # token counts
    later = [
        Case("mixed_1", (64,), (64,), num_heads=32, num_kv_heads=8),
        Case("mixed_16", (33,) * 15 + (700,), (1,) * 15 + (256,), num_heads=32, num_kv_heads=8),
        Case("mixed_17", (5,) * 16 + (1111,), (1,) * 16 + (17,), num_heads=32, num_kv_heads=8),
        Case("decode_1", (500,), (1,), num_heads=32, num_kv_heads=8),
        Case("decode_16", (460,) * 16, (1,) * 16, num_heads=32, num_kv_heads=8),
        Case("decode_33", (9, 300) * 16 + (400,), (1,) * 33, num_heads=32, num_kv_heads=8),
    ]
    spec = spec_of(warm[0], torch.device("cuda"))
    be = make_backend(backend, spec)
    for seed, case in enumerate(warm):
        check(compare(be, case, seed=seed), case.dtype)
    before = {name: _compiled_variants(k) for name, k in kernels.items()}
    for seed, case in enumerate(later):
        check(compare(be, case, seed=seed), case.dtype)
    after = {name: _compiled_variants(k) for name, k in kernels.items()}
    assert after == before
