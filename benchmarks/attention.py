"""Paged-attention kernels on one GPU: decode bandwidth against the device's copy bandwidth, and
prefill TFLOP/s, for each installed GPU backend side by side.

Decode is memory bound, so its figure of merit is KV bytes read / time next to a device-to-device
copy measured in the same run (bytes read + written / time). Times are medians of
`triton.testing.do_bench`, which flushes L2 before every repetition; metadata (FlashInfer's plan)
is built once per shape, outside the timed region, as the engine does per step.

    python benchmarks/attention.py                      # default grid, Llama-3-8B heads
    python benchmarks/attention.py --quick              # a few shapes
    python benchmarks/attention.py --sweep              # also time Triton tile configs
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib.util
import json
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton
from triton.testing import do_bench

from compiled_llm.attention_backends.base import AttentionBackend, AttentionInputs, AttentionSpec
from compiled_llm.attention_backends.registry import get_backend_class
from compiled_llm.attention_backends.triton_backend import (
    KernelConfig,
    PrefillTiles,
    TritonAttentionBackend,
)

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p.add_argument(
        "--backends",
        default="triton,flashinfer",
        help="comma list (default: both); NAME:KEY=VALUE passes a constructor argument, e.g. "
        "flashinfer:decode_tensor_cores=false (FlashInfer's CUDA-core decode kernel)",
    )
    p.add_argument("--num-heads", type=int, default=32)
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--batches", type=ints, default=[1, 8, 32, 64, 256])
    p.add_argument("--contexts", type=ints, default=[512, 2048, 8192, 32768])
    p.add_argument("--max-kv-gib", type=float, default=8.0, help="skip decode shapes above this")
    p.add_argument(
        "--prefill",
        default="1x512,1x2048,1x8192,8x1024,1x512+8192",
        help="BATCHxQUERY[+PREFIX] shapes for prefill/extend (default: %(default)s)",
    )
    p.add_argument("--quick", action="store_true", help="batches 1,64; contexts 2048,32768")
    p.add_argument("--sweep", action="store_true", help="also time Triton tile configurations")
    p.add_argument(
        "--no-graph", action="store_true", help="time decode eagerly, not as CUDA-graph replays"
    )
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: results/...)")
    return p.parse_args()


def make_backend(name: str, spec: AttentionSpec) -> AttentionBackend:
    """`NAME` or `NAME:KEY=VALUE[:KEY=VALUE]`, values as JSON (true, 4) or else strings."""
    base, *pairs = name.split(":")
    kwargs: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return get_backend_class(base)(spec, **kwargs)


def make_inputs(
    batch: int, query: int, context: int, bs: int, device: torch.device, gen: torch.Generator
) -> tuple[AttentionInputs, int]:
    """`batch` requests of `context` tokens whose last `query` are new, on shuffled pages."""
    pages = -(-context // bs)
    table = torch.randperm(batch * pages, generator=gen).to(torch.int32).view(batch, pages)
    lens = np.full(batch, context, dtype=np.int64)
    inputs, _ = AttentionInputs.from_batch(
        np.full(batch, query, dtype=np.int64), lens, table.numpy(), bs, device
    )
    return inputs, batch * pages + 1


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy of 1 GiB, bytes read + written per second."""
    src = torch.randn(256 * 1024 * 1024, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


@dataclasses.dataclass
class Shape:
    batch: int
    query: int
    context: int


def graph_ms(fn: Any) -> float:
    """Median time of `fn` captured in a CUDA graph: kernel time without Python launch cost."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, return_mode="median")


def time_shape(
    backends: dict[str, AttentionBackend],
    shape: Shape,
    spec: AttentionSpec,
    graph: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Median attend() time per backend on one batch, plus each one's error against the first.

    With `graph`, each backend is first prepared for capture (the engine's decode path: staged
    buffers, FlashInfer's CUDA-graph wrappers) and attend() is also timed as graph replays."""
    gen = torch.Generator().manual_seed(seed)
    dev = spec.device
    inputs, num_blocks = make_inputs(
        shape.batch, shape.query, shape.context, spec.block_size, dev, gen
    )
    cache = torch.empty(
        (num_blocks, 2, spec.block_size, spec.num_kv_heads, spec.head_dim),
        dtype=spec.dtype,
        device=dev,
    ).normal_()
    q = torch.randn(inputs.num_tokens, spec.num_heads, spec.head_dim, device=dev).to(spec.dtype)
    row: dict[str, Any] = {}
    first: torch.Tensor | None = None
    for name, be in backends.items():
        if graph:
            be.prepare_for_capture(max_num_reqs=shape.batch, max_num_tokens=inputs.num_tokens)
        md = be.build_metadata(inputs)
        out = torch.empty_like(q)

        def run(be: AttentionBackend = be, md: Any = md, out: torch.Tensor = out) -> None:
            be.attend(q, cache, md, out)

        run()  # warm-up: compiles / JIT loads outside the timing
        torch.cuda.synchronize()
        res = {"eager_ms": do_bench(run, return_mode="median")}
        res["ms"] = graph_ms(run) if graph else res["eager_ms"]
        o = out.float()
        res["err_vs_first"] = 0.0 if first is None else ((o - first).norm() / first.norm()).item()
        first = o if first is None else first
        row[name] = res
    return row


def kv_bytes(shape: Shape, spec: AttentionSpec) -> int:
    elem = torch.empty((), dtype=spec.dtype).element_size()
    return shape.batch * shape.context * 2 * spec.num_kv_heads * spec.head_dim * elem


def attention_flops(shape: Shape, spec: AttentionSpec) -> float:
    """Causal QK^T and PV: query j sees prefix + j + 1 keys, 4 * D flops per (query, key, head)."""
    prefix = shape.context - shape.query
    pairs = shape.query * prefix + shape.query * (shape.query + 1) / 2
    return 4.0 * shape.batch * pairs * spec.num_heads * spec.head_dim


def triton_sweep(spec: AttentionSpec) -> list[dict[str, Any]]:
    """Tile configurations for the Triton kernels on a few decisive shapes."""
    decode_cfgs = [(64, 4, 3), (128, 4, 3)]
    prefill_cfgs = [(128, 32, 4, 3), (128, 64, 8, 2)]
    rows = []
    for bn, w, st in decode_cfgs:
        for waves in (4, 8):
            cfg = KernelConfig(decode_block_n=bn, decode_warps=w, decode_stages=st, waves=waves)
            be = TritonAttentionBackend(spec, cfg)
            for shape in (Shape(1, 1, 32768), Shape(8, 1, 32768), Shape(64, 1, 8192)):
                ms = time_shape({"triton": be}, shape, spec, graph=True)["triton"]["ms"]
                rows.append({"kind": "decode", "config": dataclasses.asdict(cfg),
                             **dataclasses.asdict(shape), "ms": ms,
                             "tb_s": kv_bytes(shape, spec) / (ms * 1e-3) / 1e12})  # fmt: skip
    for bm, bn, w, st in prefill_cfgs:
        tiles = PrefillTiles(bm, bn, w, st)
        cfg = KernelConfig(prefill=tiles, prefill_small_grid=tiles)
        be = TritonAttentionBackend(spec, cfg)
        for shape in (Shape(1, 8192, 8192), Shape(8, 1024, 1024), Shape(1, 512, 8704)):
            ms = time_shape({"triton": be}, shape, spec)["triton"]["ms"]
            rows.append({"kind": "prefill", "config": dataclasses.asdict(cfg),
                         **dataclasses.asdict(shape), "ms": ms,
                         "tflops": attention_flops(shape, spec) / (ms * 1e-3) / 1e12})  # fmt: skip
    return rows


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/attention.py needs a CUDA GPU")
    dev = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    spec = AttentionSpec(
        args.num_heads, args.num_kv_heads, args.head_dim, args.block_size, dtype, dev,
        args.head_dim**-0.5,
    )  # fmt: skip
    names = [n for n in args.backends.split(",") if n]
    if importlib.util.find_spec("flashinfer") is None:
        print("flashinfer is not installed: skipping it")
        names = [n for n in names if not n.startswith("flashinfer")]
    backends = {n: make_backend(n, spec) for n in names}
    batches, contexts = ([1, 64], [2048, 32768]) if args.quick else (args.batches, args.contexts)
    versions = {"torch": torch.__version__, "triton": triton.__version__}
    if any(n.startswith("flashinfer") for n in backends):
        import flashinfer

        versions["flashinfer"] = flashinfer.__version__
    config = {
        "device": torch.cuda.get_device_name(dev),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "versions": versions,
        "python": platform.python_version(),
        "backends": names,
        "heads": f"{args.num_heads}q/{args.num_kv_heads}kv",
        "head_dim": args.head_dim,
        "block_size": args.block_size,
        "dtype": args.dtype,
        "batches": batches,
        "contexts": contexts,
        "prefill": args.prefill,
        "decode_timing": "eager" if args.no_graph else "CUDA-graph replay",
    }
    print("config:", json.dumps(config))
    bw = copy_bandwidth(dev)
    print(f"device copy bandwidth: {bw / 1e12:.2f} TB/s (read + write)")

    decode = []
    for b in batches:
        for c in contexts:
            shape = Shape(b, 1, c)
            if kv_bytes(shape, spec) > args.max_kv_gib * 2**30:
                continue
            row = time_shape(backends, shape, spec, graph=not args.no_graph)
            for r in row.values():
                r["tb_s"] = kv_bytes(shape, spec) / (r["ms"] * 1e-3) / 1e12
                r["frac_copy"] = r["tb_s"] * 1e12 / bw
            decode.append({**dataclasses.asdict(shape), "kv_mib": kv_bytes(shape, spec) / 2**20,
                           "results": row})  # fmt: skip
            print(f"decode b={b} ctx={c}: " + ", ".join(
                f"{n} {r['ms'] * 1e3:.1f} us {r['tb_s']:.2f} TB/s" for n, r in row.items()))  # fmt: skip
    prefill = []
    for item in args.prefill.split(","):
        bq, _, prefix = item.partition("+")
        b, q = (int(x) for x in bq.split("x"))
        shape = Shape(b, q, q + int(prefix or 0))
        row = time_shape(backends, shape, spec)
        for r in row.values():
            r["tflops"] = attention_flops(shape, spec) / (r["ms"] * 1e-3) / 1e12
        prefill.append({**dataclasses.asdict(shape), "results": row})
    sweep = triton_sweep(spec) if args.sweep and "triton" in backends else []

    out = args.out or RESULTS / f"attention-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"config": config, "copy_tb_s": bw / 1e12, "decode": decode, "prefill": prefill}
    out.write_text(json.dumps({**payload, "sweep": sweep}, indent=1))
    if sweep:
        print("\nTriton sweep (best first per shape):")
        for r in sorted(sweep, key=lambda r: (r["kind"], r["batch"], r["context"], r["ms"])):
            perf = (
                f"{r['tb_s']:.2f} TB/s" if r["kind"] == "decode" else f"{r['tflops']:.0f} TFLOP/s"
            )
            cfg = {k: v for k, v in r["config"].items() if k.startswith(r["kind"]) or k == "waves"}
            cfg = cfg.get("prefill", cfg)
            print(f"  {r['kind']} b={r['batch']} q={r['query']} ctx={r['context']}: {perf} {cfg}")
    print_table(config, bw, decode, prefill, names, out)


def print_table(
    config: dict[str, Any], bw: float, decode: list, prefill: list, names: list[str], out: Path
) -> None:
    print(f"\n{config['device']}, {config['dtype']}, heads {config['heads']}, "
          f"head_dim {config['head_dim']}, block {config['block_size']}; {config['versions']}")  # fmt: skip
    print(
        f"decode ({config['decode_timing']}): KV bytes read / time vs device copy "
        f"{bw / 1e12:.2f} TB/s"
    )
    head = " | ".join(f"{n:>10} us  TB/s  %copy" for n in names)
    print(f"{'batch':>5} {'context':>7} {'KV MiB':>8} | {head}")
    for r in decode:
        cells = " | ".join(
            f"{r['results'][n]['ms'] * 1e3:13.1f} {r['results'][n]['tb_s']:5.2f} "
            f"{100 * r['results'][n]['frac_copy']:5.0f}%"
            for n in names
        )
        print(f"{r['batch']:>5} {r['context']:>7} {r['kv_mib']:>8.0f} | {cells}")
    print("prefill / extend: causal attention TFLOP/s")
    head = " | ".join(f"{n:>10} us TFLOP/s" for n in names)
    print(f"{'batch':>5} {'query':>6} {'prefix':>6} | {head}")
    for r in prefill:
        cells = " | ".join(
            f"{r['results'][n]['ms'] * 1e3:13.1f} {r['results'][n]['tflops']:7.0f}" for n in names
        )
        print(f"{r['batch']:>5} {r['query']:>6} {r['context'] - r['query']:>6} | {cells}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
