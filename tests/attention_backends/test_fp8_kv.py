"""FP8 (E4M3) KV cache: keys and values stored saturated at +-448 with a per-tensor scale of 1,
read back exactly. The torch reference reading an FP8 cache equals it reading the same values
from a float32 cache, and stays within the bound E4M3 rounding of K and V allows of attention
over the unrounded ones; the Triton kernels (interpreted on CPU, on CUDA in `gpu` tests) and
FlashInfer (`gpu`) against the reference; and the engine's cache holds 2x the tokens of bf16.

The bound: each stored element errs by e(x) <= 2^-4 |x| + 2^-10 (3 mantissa bits; subnormal
spacing 2^-9 below 2^-6). A score q.k moves by at most eps = scale * sum_d |q_d| e(k_d), so each
softmax weight by a factor within exp(+-2 eps), and the output by at most
(exp(2 max eps) - 1) max|v| + max e(v)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from compiled_llm.attention_backends.base import FP8_KV_DTYPE, to_cache_dtype
from compiled_llm.attention_backends.torch_ref import TorchAttentionBackend
from tests.attention_backends.test_backends import HAS_FLASHINFER, Case, make_inputs, spec_of

ROOT = Path(__file__).resolve().parents[2]
CASES = [
    Case("mixed", seq_lens=(37, 1, 90, 64), query_lens=(37, 1, 5, 1), head_dim=64, pad_tokens=3),
    Case("decode", seq_lens=(200, 17, 33), query_lens=(1, 1, 1), head_dim=128),
]


def fp8_spec(case: Case, device: torch.device):  # noqa: ANN201
    return replace(spec_of(case, device), kv_cache_dtype=FP8_KV_DTYPE)


def run(backend, case: Case, seed: int = 0, cache_dtype: torch.dtype | None = None):  # noqa: ANN001
    """Write a batch's k/v with `backend` into a random cache of `cache_dtype` (the backend's
    own by default; a NaN page fills unused table entries), then attend. Returns (cache, out,
    q, k, v, inputs)."""
    device = backend.spec.device
    gen = torch.Generator().manual_seed(seed)
    inputs = make_inputs(case, device, gen)
    rows = inputs.slot_mapping.shape[0]
    q, k, v = (
        (2 * torch.randn(rows, h, case.head_dim, generator=gen)).to(case.dtype).to(device)
        for h in (case.num_heads, case.num_kv_heads, case.num_kv_heads)
    )
    k[0, 0, :4] = torch.tensor([500.0, -1000.0, 448.0, 1e-3])  # saturated, exact, subnormal
    num_blocks = int(inputs.block_table.max()) + 1
    shape = (num_blocks, 2, case.block_size, case.num_kv_heads, case.head_dim)
    dtype = cache_dtype or backend.spec.cache_dtype
    cache = to_cache_dtype(2 * torch.randn(shape, generator=gen), dtype)
    cache[-1] = float("nan")
    cache = cache.to(device)
    md = backend.build_metadata(inputs)
    backend.write_kv(k, v, cache, md)
    out = torch.full_like(q, float("nan"))
    backend.attend(q, cache, md, out)
    return cache, out[: inputs.num_tokens].float(), q, k, v, inputs


def error_bound(q, k, v, inputs, scale: float, vmax: float) -> torch.Tensor:  # noqa: ANN001
    """Per query token, the bound of the module docstring over every key of its request (the
    cached prefix is stored in FP8 both ways, so only this step's keys and values count)."""
    u, a = 2.0**-4, 2.0**-10
    bounds = []
    starts = inputs.query_start_loc_cpu.tolist()
    for i in range(inputs.num_reqs):
        rows = slice(starts[i], starts[i + 1])
        qi, ki, vi = q[rows].double(), k[rows].double(), v[rows].double()
        group = qi.shape[1] // ki.shape[1]
        ek = (u * ki.abs() + a).repeat_interleave(group, dim=1)  # [t, Hq, D]
        eps = scale * torch.einsum("thd,shd->ths", qi.abs(), ek).amax(dim=-1)  # [t, Hq]
        ev = (u * vi.abs() + a).amax()
        bounds.append((torch.exp(2 * eps) - 1) * vmax + ev)
    return torch.cat(bounds)[:, :, None]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_reference_reads_fp8_exactly(case: Case) -> None:
    cpu = torch.device("cpu")
    fp8 = TorchAttentionBackend(fp8_spec(case, cpu))
    cache, out, q, k, v, inputs = run(fp8, case)
    assert cache.dtype == FP8_KV_DTYPE
    slot = int(inputs.slot_mapping[0])
    stored = cache[slot // case.block_size, 0, slot % case.block_size, 0, :4].float()
    assert stored.tolist() == [448.0, -448.0, 448.0, float(torch.tensor(1e-3).to(FP8_KV_DTYPE))]
    # The same values in a float32 cache, attended by the same code: the same output.
    wide = TorchAttentionBackend(spec_of(replace(case, dtype=torch.float32), cpu))
    md = wide.build_metadata(inputs)
    again = torch.full(q.shape, float("nan"))
    wide.attend(q.float(), cache.float(), md, again)
    torch.testing.assert_close(out, again[: inputs.num_tokens], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_reference_within_e4m3_bound(case: Case) -> None:
    """Against attention over this step's k/v unrounded, in a float32 cache holding the same
    (FP8) prefix."""
    cpu = torch.device("cpu")
    fp8 = TorchAttentionBackend(fp8_spec(case, cpu))
    cache, out, q, k, v, inputs = run(fp8, case)
    wide = TorchAttentionBackend(spec_of(replace(case, dtype=torch.float32), cpu))
    unrounded = cache.float()
    md = wide.build_metadata(inputs)
    wide.write_kv(k.float(), v.float(), unrounded, md)
    exact = torch.full(q.shape, float("nan"))
    wide.attend(q.float(), unrounded, md, exact)
    err = (out - exact[: inputs.num_tokens]).abs()
    vmax = float(unrounded[:-1].abs().max())  # the NaN page aside
    bound = error_bound(q, k, v, inputs, fp8.spec.scale, vmax)[: inputs.num_tokens]
    assert bool((err <= bound.float()).all()), float((err - bound).max())
    assert float(err.max()) > 0  # the keys and values really were rounded


def test_engine_cache_holds_twice_the_tokens(tiny_models) -> None:
    from compiled_llm import LLM, SamplingParams

    path = str(tiny_models("llama"))
    common = dict(max_model_len=256, enforce_eager=True, dtype="bfloat16", device="cpu")
    common["kv_cache_memory_bytes"] = 1 << 21
    auto = LLM(path, **common)
    fp8 = LLM(path, kv_cache_dtype="fp8", **common)
    assert fp8.engine.core.num_blocks == 2 * auto.engine.core.num_blocks
    assert fp8.engine.core.runner.kv_caches[0].dtype == FP8_KV_DTYPE
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    out = fp8.generate(["The capital of France is", "x"], params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 6 for o in out)


# --- Triton, interpreted on CPU ------------------------------------------------------------------
def interpreter_errors() -> None:
    """Under TRITON_INTERPRET=1: the Triton backend on an FP8 cache against the reference."""
    from compiled_llm.attention_backends.triton_backend import TritonAttentionBackend
    from tests.kernels.test_fp8 import interpreted_code_mismatches

    cpu = torch.device("cpu")
    out = {}
    for case in CASES:
        case = replace(case, head_dim=32, dtype=torch.float32)
        ref_cache, ref, q, k, v, inputs = run(TorchAttentionBackend(fp8_spec(case, cpu)), case)
        triton = TritonAttentionBackend(fp8_spec(case, cpu))
        cache, *_ = run(triton, case)  # its own write: checked below, code by code
        # Attention over the reference's cache (the interpreter's E4M3 conversion defects,
        # excused below, would otherwise change a few stored values by a power of two).
        got = torch.full(q.shape, float("nan"))
        triton.attend(q, ref_cache, triton.build_metadata(inputs), got)
        got = got[: inputs.num_tokens]
        out[f"{case.name}/attend"] = float((got - ref).norm() / ref.norm())
        written = (ref_cache.view(torch.uint8) != cache.view(torch.uint8)).any(dim=(-1, -2))
        mismatches = 0
        for slot, t in zip(inputs.slot_mapping.tolist(), range(inputs.num_tokens)):
            b, o = divmod(slot, case.block_size)
            for which, x in ((0, k[t]), (1, v[t])):
                mismatches += interpreted_code_mismatches(
                    cache[b, which, o], ref_cache[b, which, o], x.clamp(-448, 448), 1.0
                )
        out[f"{case.name}/written_codes"] = mismatches
        out[f"{case.name}/only_slots_written"] = int(written.sum()) <= 2 * inputs.num_tokens
    print(json.dumps(out))


@pytest.mark.slow
def test_triton_fp8_cache_interpreted() -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = (
        "from tests.attention_backends.test_fp8_kv import interpreter_errors; interpreter_errors()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    for key, err in errors.items():
        if key.endswith("/attend"):
            assert err < 1e-5, (key, err)  # float32, summed in another order
        elif key.endswith("written_codes"):
            assert err == 0, (key, err)
        else:
            assert err, key


@pytest.mark.slow
def test_attention_kernels_compile_for_hopper_with_fp8_cache() -> None:
    """The KV-write and attention kernels with an FP8 cache and bf16 q/k/v compile to sm_90
    cubins (Triton's own ptxas, no GPU): what the interpreter does not check."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from compiled_llm.attention_backends.triton_kernels import decode, kv_write, prefill

    def signature(fn, consts: dict) -> dict[str, str]:  # noqa: ANN001
        types = {}
        for name in fn.arg_names:
            if name in consts:
                types[name] = "constexpr"
            elif name == "cache_ptr":
                types[name] = "*fp8e4nv"
            elif name in ("block_table_ptr", "seq_lens_ptr", "query_start_ptr", "lock_ptr"):
                types[name] = "*i32"
            elif name in ("slot_ptr", "pos_ptr"):
                types[name] = "*i64"
            elif name in ("part_o_ptr", "part_lse_ptr", "cos_ptr", "sin_ptr"):
                types[name] = "*fp32"
            elif name.endswith("_ptr"):
                types[name] = "*bf16"
            elif name in ("qk_scale", "cap"):
                types[name] = "fp32"
            else:
                types[name] = "i32"
        return types

    heads = dict(HEAD_DIM=128, D_PAD=128, BLOCK_SIZE=16)
    pdl = dict(USE_PDL=True)  # launched after the kernel before them may still run
    kernels = [
        (
            kv_write._write_kv_kernel,
            dict(NUM_KV_HEADS=8, H_PAD=8, SATURATE=True, **heads, **pdl),
        ),
        (
            kv_write._rope_write_kv_kernel,
            dict(
                NUM_HEADS=32,
                HQ_PAD=32,
                NUM_KV_HEADS=8,
                HKV_PAD=8,
                HALF=64,
                HALF_PAD=64,
                BLOCK_SIZE=16,
                HAS_POSITIONS=False,
                K_IN_PLACE=False,
                SATURATE=True,
                **pdl,
            ),
        ),
        (
            decode._decode_split_kernel,
            dict(
                GROUP=4,
                GROUP_PAD=16,
                BLOCK_N=64,
                SINGLE_SPLIT=False,
                SLIDING=False,
                SOFT_CAP=False,
                DOT_PRECISION="tf32",
                **heads,
                **pdl,
            ),
        ),
        (
            prefill._prefill_kernel,
            dict(
                GROUP=4,
                GROUP_PAD=4,
                BLOCK_Q=32,
                BLOCK_M=128,
                BLOCK_N=32,
                SLIDING=False,
                SOFT_CAP=False,
                DOT_PRECISION="tf32",
                **heads,
            ),
        ),
    ]
    for fn, consts in kernels:
        source = ASTSource(fn, signature(fn, consts), consts)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], fn
        assert ("griddepcontrol.wait" in compiled.asm["ptx"]) == ("USE_PDL" in consts), fn


# --- CUDA ----------------------------------------------------------------------------------------
def _cuda_backends(case: Case):  # noqa: ANN202
    from compiled_llm.attention_backends.triton_backend import TritonAttentionBackend

    spec = fp8_spec(case, torch.device("cuda"))
    backends = [TritonAttentionBackend(spec)]
    if HAS_FLASHINFER:
        from compiled_llm.attention_backends.flashinfer import FlashInferAttentionBackend

        backends.append(FlashInferAttentionBackend(spec))
    return backends


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_cuda_backends_on_fp8_cache(case: Case) -> None:
    """Each GPU backend writes the reference's bytes (saturation and rounding included) and
    attends as the reference does on the same FP8 cache (bf16 tolerance), so within the E4M3
    bound the CPU tests check for the reference."""
    ref_cache, ref, *_ = run(TorchAttentionBackend(fp8_spec(case, torch.device("cuda"))), case)
    for backend in _cuda_backends(case):
        cache, got, *_ = run(backend, case)
        assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8)), backend.name
        assert torch.isfinite(got).all(), backend.name
        err = ((got - ref).norm() / ref.norm()).item()
        assert err < 1e-2, (backend.name, err)


def test_bad_kv_cache_dtype_is_refused() -> None:
    from compiled_llm.config import EngineArgs

    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8"):
        EngineArgs(kv_cache_dtype="int8")
    spec = spec_of(CASES[0], torch.device("cpu"))
    with pytest.raises(ValueError, match="kv_cache_dtype must be"):
        replace(spec, kv_cache_dtype=torch.float16)
