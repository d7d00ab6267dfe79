"""FP8 GEMM kernels per shape: which one should serve which token count.

For each linear of a model shape (q/k/v merged, o_proj, gate/up merged, down_proj) and each token
count M: cuBLASLt's row-wise scaled FP8 GEMM (`torch._scaled_mm`), our Triton FP8 GEMM, our
Triton GEMV (M = 1), the Triton GEMM with 128 x 128 block scales, and the bf16 GEMM. Each kernel
is captured in a CUDA graph over copies of the weight that overflow L2 and the replays are timed
with CUDA events (median of --iters; activation quantization not included). Prints
microseconds and weight bandwidth (bytes of the weight / time); the "tuned" column is the kernel
that the GPU's tuned table (compiled_llm/kernels/fp8_tuning.py) picks, i.e. what the engine runs.

--tune sweeps Triton tiles (and the GEMV at one token) for each shape at each token count up to
128, keeps the fastest kernel that matches cuBLASLt's output, and writes the table the engine
reads (the shapes tuned are replaced, others kept).

  python benchmarks/fp8_gemm.py --shape llama-3.1-8b
  python benchmarks/fp8_gemm.py --tune --shape llama-3.1-8b
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import environment, print_table, write_result  # noqa: E402
from shapes import SHAPES  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    p.add_argument("--tokens", default="1,2,4,8,16,32,64,128,256,512,1024,4096")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--tune", action="store_true", help="sweep tiles and write the tuned table")
    p.add_argument("--tune-tokens", default="1,2,4,8,16,32,64,128")
    p.add_argument("--output", default=None, help="table to write (default: this GPU's)")
    return p.parse_args()


def linears(shape: str) -> dict[str, tuple[int, int]]:
    """(N, K) of each GEMM of a decoder layer, merged as gemm_merge merges them."""
    c = SHAPES[shape]
    h, inter = c["hidden_size"], c["intermediate_size"]
    head_dim = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    return {"qkv": (q + 2 * kv, h), "o": (h, q), "gate_up": (2 * inter, h), "down": (h, inter)}


L2_BYTES = 64 << 20  # at least the L2 of the GPUs we time (H100/H200: 50 MB)


def time_us(fns, iters: int) -> float:  # noqa: ANN001
    """Microseconds per call: `fns` (one closure per copy of the operands, so that the weights
    stream from HBM, not L2) captured back to back in one CUDA graph, whose replays are timed
    with CUDA events (median of `iters`). Graph replay leaves out the host's launch time, as the
    engine's CUDA graphs do; per-call events around a Python launch would time the host."""
    import torch

    for fn in fns:  # compile and autotune outside the capture
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    samples = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / len(fns))
    return statistics.median(samples)


def time_kernels(w, m: int, iters: int) -> dict[str, float]:  # noqa: ANN001
    """Microseconds of each kernel for M = m tokens against the weight w [N, K]."""
    import torch

    from compiled_llm.kernels import fp8 as F8
    from compiled_llm.kernels import triton_fp8 as T

    n, k = w.shape
    # Enough copies of the FP8 weight that one pass over them overflows L2 twice.
    copies = max(2, min(16, -(-2 * L2_BYTES // (n * k))))
    ws = [w] + [w + 1e-3 * torch.randn_like(w) for _ in range(copies - 1)]
    per_channel = [F8.quantize_weight(wi) for wi in ws]
    block = [F8.quantize_weight(wi, (128, 128)) for wi in ws]
    w16 = [wi.bfloat16() for wi in ws]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    a, sa = F8.quantize_per_token(x)
    ag, sag = F8.quantize_per_group(x, 128)
    bf16 = torch.bfloat16
    gemm_tiles = T.default_tiles(max(m, 2), None)  # the GEMM's default tiles, also at M = 1

    def each(call):  # noqa: ANN001, ANN202
        return [lambda i=i: call(i) for i in range(copies)]

    def cublas(i: int) -> torch.Tensor:
        b, sb = per_channel[i]
        return torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb.view(1, n), out_dtype=bf16)

    row = {
        "cublaslt": time_us(each(cublas), iters),
        "triton": time_us(
            each(lambda i: T.scaled_mm(a, sa, *per_channel[i], [], None, bf16, gemm_tiles)), iters
        ),
        "tuned": time_us(
            each(
                lambda i: torch.ops.compiled_llm.fp8_scaled_mm(
                    a, sa, *per_channel[i], [], None, bf16
                )
            ),
            iters,
        ),
        "triton_block": time_us(
            each(lambda i: T.scaled_mm(ag, sag, *block[i], [128, 128], None, bf16)), iters
        ),
        "bf16": time_us(each(lambda i: x @ w16[i].t()), iters),
    }
    if m == 1:
        row["triton_gemv"] = time_us(
            each(lambda i: T.scaled_mm(a, sa, *per_channel[i], [], None, bf16)), iters
        )
    return row


def tune_shape(w, tokens: list[int], iters: int) -> list[dict]:  # noqa: ANN001
    """Table entries for the weight w [N, K]: per token count, the fastest of cuBLASLt and each
    candidate's tiles whose output matches cuBLASLt's (bf16 output, 1% of the largest value)."""
    import dataclasses

    import torch

    from compiled_llm.kernels import fp8 as F8
    from compiled_llm.kernels import triton_fp8 as T
    from compiled_llm.kernels.fp8_tuning import candidate_tiles

    n, k = w.shape
    copies = max(2, min(16, -(-2 * L2_BYTES // (n * k))))
    per_channel = [F8.quantize_weight(w + 1e-3 * i * torch.randn_like(w)) for i in range(copies)]
    bf16 = torch.bfloat16
    entries = []
    for m in tokens:
        x = torch.randn(m, k, device="cuda", dtype=bf16)
        a, sa = F8.quantize_per_token(x)

        def cublas(i: int, a=a, sa=sa) -> torch.Tensor:  # noqa: ANN001
            b, sb = per_channel[i]
            return torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb.view(1, n), out_dtype=bf16)

        want = cublas(0).float()
        tol = 1e-2 * float(want.abs().max())
        best = {"max_tokens": m, "kernel": "cublas"}
        best_us = cublas_us = time_us([lambda i=i: cublas(i) for i in range(copies)], iters)
        for tiles in candidate_tiles(m):

            def call(i: int, a=a, sa=sa, tiles=tiles) -> torch.Tensor:  # noqa: ANN001
                return T.scaled_mm(a, sa, *per_channel[i], [], None, bf16, tiles)

            try:
                if float((call(0).float() - want).abs().max()) > tol:
                    print(f"  skipped (wrong output): N={n} K={k} M={m} {tiles}")
                    continue
                us = time_us([lambda i=i: call(i) for i in range(copies)], iters)
            except Exception as e:  # a tile that does not fit the GPU (shared memory, registers)
                print(f"  skipped ({type(e).__name__}): N={n} K={k} M={m} {tiles}")
                continue
            if us < best_us:
                fields = dataclasses.asdict(tiles)
                kernel = "gemv" if fields.pop("gemv") else "triton"
                best, best_us = {"max_tokens": m, "kernel": kernel, **fields}, us
        best.update(us=round(best_us, 2), cublas_us=round(cublas_us, 2))
        print(f"  N={n} K={k} M={m}: {best}")
        entries.append(best)
    return entries


def tune(args: argparse.Namespace, env: dict) -> None:
    import torch

    from compiled_llm.kernels import fp8_tuning

    path = args.output or str(fp8_tuning.table_path(torch.cuda.get_device_name()))
    table = {"shapes": {}}
    if os.path.isfile(path):
        with open(path) as f:
            table = json.load(f)
    tokens = [int(t) for t in args.tune_tokens.split(",")]
    for name, (n, k) in linears(args.shape).items():
        print(f"{name}: N={n} K={k}")
        w = torch.randn(n, k, device="cuda") * 0.02
        table["shapes"][f"{n},{k}"] = tune_shape(w, tokens, args.iters)
    table["env"] = env
    fp8_tuning.parse_table(table, path)  # what the engine will read
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    print(f"\ntable: {path}")


def main() -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA")
    args = parse_args()
    env = environment()
    print("config:", json.dumps(vars(args)), json.dumps(env), sep="\n  ")
    if args.tune:
        tune(args, env)
        return
    tokens = [int(t) for t in args.tokens.split(",")]
    results: dict[str, dict[int, dict[str, float]]] = {}
    for name, (n, k) in linears(args.shape).items():
        w = torch.randn(n, k, device="cuda") * 0.02
        results[name] = {m: time_kernels(w, m, args.iters) for m in tokens}
    path = write_result(
        f"fp8_gemm-{args.shape}",
        {"config": vars(args), "env": env, "results": results},
    )
    print(f"\nresults: {path}\n")
    kinds = ["tuned", "cublaslt", "triton", "triton_gemv", "triton_block", "bf16"]
    rows = []
    for name, (n, k) in linears(args.shape).items():
        for m in tokens:
            r = results[name][m]
            cells = [f"{r[kind]:.1f}" if kind in r else "-" for kind in kinds]
            best = min(
                r[kind] for kind in ("tuned", "cublaslt", "triton", "triton_gemv") if kind in r
            )
            rows.append([name, m, *cells, f"{n * k / best / 1e6:.2f}"])
    print_table(["gemm", "M", *(f"{k} us" for k in kinds), "FP8 weight TB/s (best)"], rows)


if __name__ == "__main__":
    main()
