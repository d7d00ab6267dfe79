"""Decode latency and prefill time per compilation level, against the bandwidth roofline.

Decode at batch B: ms per engine step (schedule + forward + sample + detokenize-free outputs),
output tokens/s, and weight bytes read per step over step time, compared with the device copy
bandwidth measured in the same run. Prefill: one request of 1k and 4k tokens. Each level runs in
a fresh process. Random weights from a config dict (benchmarks/shapes.py), never a download.

Roofline: a decode step must read its weights once, so batch-1 tok/s cannot exceed copy
bandwidth / bytes read per step (shapes.weight_bytes): every weight but the embedding table
(its rows are gathered; a tied one is read as the LM head), and of an MoE layer only the router
and the top_k experts a token routes to, the *active* parameters (Qwen3-30B-A3B: about 3.3B of
30.5B). At batch B the "weights GB/s" column counts the distinct experts B tokens are expected
to touch under uniform routing (exact at batch 1). KV-cache reads are not counted.

  python benchmarks/latency.py --shape llama-3.1-8b --levels 0,1,2
  python benchmarks/latency.py --shape llama-3.1-8b --levels 2 --quantization fp8 \\
      --kv-cache-dtype fp8
  python benchmarks/latency.py --shape tiny --levels 0,1 --batch-sizes 1,4 --decode-steps 4 \\
      --prefill-lens 64   # CPU smoke run
  python benchmarks/latency.py --shape llama-3.1-8b --levels 2 --tensor-parallel-size 2

With --tensor-parallel-size N the weights are split over N GPUs, whose copy bandwidths add up:
the roofline and the "of copy bw" column use N x one GPU's copy bandwidth (the all-reduces'
time is not in it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    copy_bandwidth,
    environment,
    print_table,
    profile_engine_steps,
    run_worker,
    write_result,
)
from shapes import SHAPES, shape_folder, weight_bytes  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    p.add_argument("--levels", default="0,1,2", help="compilation levels (-O) to compare")
    p.add_argument("--batch-sizes", default="1,8,64")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--prefill-lens", default="1024,4096")
    p.add_argument(
        "--prefill-repeats", type=int, default=5, help="timed prefills per length (median)"
    )
    p.add_argument("--dtype", default="auto")
    p.add_argument(
        "--quantization",
        default=None,
        choices=["fp8"],
        help="quantize the weights at load (the roofline then counts 1 byte per linear weight)",
    )
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    p.add_argument(
        "-tp", "--tensor-parallel-size", type=int, default=1, help="ranks (GPUs) to shard over"
    )
    p.add_argument("--attention-backend", default="auto")
    p.add_argument(
        "--model-impl",
        default="auto",
        choices=["auto", "native", "transformers"],
        help="transformers: run the shape through the transformers fallback",
    )
    p.add_argument("--passes", default="", help="pass edits, e.g. -fuse_add_rmsnorm")
    p.add_argument("--capture-sizes", default="", help="CUDA-graph sizes (default: the engine's)")
    p.add_argument("--no-async-scheduling", action="store_true")
    p.add_argument(
        "--idle-steps",
        type=int,
        default=16,
        help="decode steps profiled per batch size for the GPU-idle fraction (0: skip)",
    )
    p.add_argument(
        "--peer",
        action="store_true",
        help="also run HF transformers' generate (static cache, torch.compile) at batch 1",
    )
    p.add_argument("--peer-compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--worker-level", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--peer-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.prefill_repeats < 1:
        p.error("--prefill-repeats must be at least 1 (the median of that many timed prefills)")
    return args


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def worker(args: argparse.Namespace) -> dict:
    import torch

    from compiled_llm import LLM, SamplingParams

    cuda = torch.cuda.is_available()
    batches, prefills = _ints(args.batch_sizes), _ints(args.prefill_lens)
    longest = max(prefills + [args.prompt_len + args.decode_steps + args.idle_steps + 32])
    start = time.perf_counter()
    llm = LLM(
        shape_folder(args.shape),
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype=args.dtype,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
        tensor_parallel_size=args.tensor_parallel_size,
        max_model_len=max(2 * longest, 2048),
        max_num_seqs=max(batches),
        max_num_batched_tokens=max(longest, 2048),
        enable_prefix_caching=False,
        compilation_level=args.worker_level,
        attention_backend=args.attention_backend,
        model_impl=args.model_impl,
        passes=[p for p in args.passes.split(",") if p],
        cudagraph_capture_sizes=_ints(args.capture_sizes) or None,
        async_scheduling=not args.no_async_scheduling,
        gpu_memory_utilization=0.85,
        kv_cache_memory_bytes=None if cuda else 1 << 28,
    )
    startup_s = time.perf_counter() - start
    engine = llm.engine
    runner = engine.core.runner
    vocab = int(engine.config.model_config.hf_config.vocab_size)
    rng = random.Random(0)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def add(prefix: str, n: int, length: int, max_tokens: int) -> list[str]:
        ids = []
        for i in range(n):
            rid = f"{prefix}-{i}"
            prompt = {"prompt_token_ids": [rng.randrange(vocab) for _ in range(length)]}
            engine.add_request(
                rid, prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
            )
            ids.append(rid)
        return ids

    decode, idle = {}, {}
    for b in batches:
        # Requests outlive the timed and the profiled steps: none finishes inside a window.
        ids = add(f"decode{b}", b, args.prompt_len, args.decode_steps + args.idle_steps + 16)
        for _ in range(4):  # prefill, then warm decode steps
            engine.step()
        sync()
        t = time.perf_counter()
        for _ in range(args.decode_steps):
            engine.step()
        sync()
        decode[b] = (time.perf_counter() - t) / args.decode_steps
        if cuda and args.idle_steps:
            idle[b] = profile_engine_steps(engine, args.idle_steps)[1]
        for rid in ids:
            engine.abort_request(rid)
    prefill = {}
    for length in prefills:
        times = []
        for attempt in range(1 + args.prefill_repeats):  # the first run of a size warms kernels
            (rid,) = add(f"prefill{length}-{attempt}", 1, length, 1)
            sync()
            t = time.perf_counter()
            engine.step()
            sync()
            times.append(time.perf_counter() - t)
            engine.abort_request(rid)
        prefill[length] = statistics.median(times[1:])
    stats = runner.compiled.stats if runner.compiled else None
    return {
        "level": args.worker_level,
        "attention_backend": runner.backend.name,
        "startup_s": startup_s,
        "decode_s_per_step": decode,
        "gpu_idle_fraction": idle,
        "prefill_s": prefill,
        "compile": {
            "warm": stats.warm,
            "trace_s": stats.trace_s,
            "passes_s": stats.passes_s,
            "inductor_s": stats.inductor_s,
            "load_s": stats.load_s,
        }
        if stats
        else None,
        "cudagraph_capture_s": runner.graphs.capture_seconds if runner.graphs else None,
        "full_graph_replays": runner.graphs.full_replays if runner.graphs else None,
    }


def peer_worker(args: argparse.Namespace) -> dict:
    """HF transformers on the same shape and weights scheme: batch-1 `generate` with a static
    KV cache, which transformers compiles itself on CUDA (torch.compile, reduce-overhead mode:
    its documented latency recipe). Compiling `model.forward` by hand on top of that breaks
    (CUDA-graph outputs overwritten by the next step)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, StaticCache

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = AutoConfig.from_pretrained(shape_folder(args.shape))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    rng = random.Random(0)
    ids = torch.tensor([[rng.randrange(config.vocab_size) for _ in range(args.prompt_len)]])
    ids = ids.to(device)

    def run(new_tokens: int) -> float:
        # One cache length for every call: transformers compiles for the static cache's shape, so
        # a cache sized per call would recompile on each.
        cache = StaticCache(config=config, max_cache_len=args.prompt_len + args.decode_steps + 1)
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(
                ids,
                past_key_values=cache,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                disable_compile=not args.peer_compile,
                pad_token_id=0,
            )
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    start = time.perf_counter()
    run(args.decode_steps)  # compiles
    run(args.decode_steps)  # reduce-overhead mode records its CUDA graphs on a later call
    warmup_s = time.perf_counter() - start
    short, long = run(1), run(1 + args.decode_steps)
    return {"warmup_s": warmup_s, "decode_s_per_step": (long - short) / args.decode_steps}


def main() -> None:
    args = parse_args()
    if args.worker_level is not None:
        print(json.dumps(worker(args)))
        return
    if args.peer_worker:
        print(json.dumps(peer_worker(args)))
        return
    env = environment()
    print("config:", json.dumps(vars(args)), json.dumps(env), sep="\n  ")
    bandwidth = copy_bandwidth() * args.tensor_parallel_size  # the ranks read their shards at once
    q = args.quantization
    _, read_bytes = weight_bytes(args.shape, quantization=q)  # batch 1: the active weights
    read_at = {
        b: weight_bytes(args.shape, batch=b, quantization=q)[1] for b in _ints(args.batch_sizes)
    }
    roofline_tok_s = bandwidth / read_bytes
    print(
        f"device copy bandwidth {bandwidth / 1e12:.3f} TB/s"
        + (f" ({args.tensor_parallel_size} devices)" if args.tensor_parallel_size > 1 else "")
        + f"; {read_bytes / 1e9:.2f} GB of weights "
        f"read per batch-1 step; batch-1 roofline {roofline_tok_s:.1f} tok/s"
    )
    results = {}
    for level in _ints(args.levels):
        worker_args = [a for a in sys.argv[1:]] + ["--worker-level", str(level)]
        results[level] = run_worker(os.path.abspath(__file__), worker_args)
        if "error" in results[level]:
            print(f"-O{level} failed:\n{results[level]['error']}")
    peer = None
    if args.peer:
        peer = run_worker(os.path.abspath(__file__), [*sys.argv[1:], "--peer-worker"])
        if "error" in peer:
            print(f"HF peer failed:\n{peer['error']}")
            peer = None
    rows = []
    for level, r in results.items():
        if "error" in r:
            continue
        for b, s in r["decode_s_per_step"].items():
            achieved = read_at[int(b)] / s
            idle = r["gpu_idle_fraction"].get(b)
            rows.append(
                [
                    f"-O{level}",
                    r["attention_backend"],
                    b,
                    s * 1e3,
                    int(b) / s,
                    achieved / 1e9,
                    f"{100 * achieved / bandwidth:.0f}%",
                    "-" if idle is None else f"{100 * idle:.1f}%",
                ]
            )
    path = write_result(
        f"latency-{args.shape}"
        + (f"-tp{args.tensor_parallel_size}" if args.tensor_parallel_size > 1 else "")
        + (f"-{args.quantization}" if args.quantization else "")
        + ("-kv-fp8" if args.kv_cache_dtype == "fp8" else "")
        + ("-transformers" if args.model_impl == "transformers" else ""),
        {
            "config": vars(args),
            "env": env,
            "copy_bandwidth": bandwidth,
            "read_bytes": read_bytes,
            "read_bytes_by_batch": read_at,
            "results": results,
            "hf_peer": peer,
        },
    )
    print(f"\nresults: {path}\n")
    if peer is not None:
        s = peer["decode_s_per_step"]
        rows.append(
            [
                "HF peer",
                "sdpa",
                1,
                s * 1e3,
                1 / s,
                read_bytes / s / 1e9,
                f"{100 * read_bytes / s / bandwidth:.0f}%",
                "-",
            ]
        )
    headers = ["level", "backend", "batch", "ms/step", "tok/s", "weights GB/s", "of copy bw"]
    print_table([*headers, "GPU idle"], rows)
    print(f"\nbatch-1 roofline {roofline_tok_s:.1f} tok/s; ratio to it and to the peer:")
    for level, r in results.items():
        if "error" in r or "1" not in r["decode_s_per_step"]:
            continue
        tok_s = 1 / r["decode_s_per_step"]["1"]
        line = f"  -O{level}: {tok_s / roofline_tok_s:.2f}x roofline"
        if peer is not None:
            line += f", {tok_s * peer['decode_s_per_step']:.2f}x HF peer"
        print(line)
    prows = [
        [f"-O{lv}", length, s * 1e3]
        for lv, r in results.items()
        if "error" not in r
        for length, s in r["prefill_s"].items()
    ]
    print()
    print_table(["level", "prefill tokens", "ms"], prows)
    crows = [
        [
            f"-O{lv}",
            r["startup_s"],
            (r["compile"] or {}).get("trace_s", 0.0),
            (r["compile"] or {}).get("inductor_s", 0.0),
            r["cudagraph_capture_s"] or 0.0,
        ]
        for lv, r in results.items()
        if "error" not in r
    ]
    print()
    print_table(["level", "startup s", "trace s", "inductor s", "graph capture s"], crows)


if __name__ == "__main__":
    main()
