"""Per-pass ablation: decode step time and prefill time with each pass flipped from its default.

Each configuration runs benchmarks/latency.py's worker in a fresh process (decode: mean step time
over --decode-steps; prefill: median of --prefill-repeats timed prefills after a warm-up one); the
baseline is the default pipeline. Random weights from a config dict (benchmarks/shapes.py).

  python benchmarks/passes.py --shape llama-3.1-8b
  python benchmarks/passes.py --shape llama-3.1-8b --quantization fp8   # the FP8 fusions too
  python benchmarks/passes.py --shape tiny -O 1 --batch-sizes 1 --decode-steps 4 \\
      --prefill-lens 64   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import environment, print_table, run_worker, write_result  # noqa: E402
from latency import parse_args as latency_args  # noqa: E402
from shapes import SHAPES  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    p.add_argument("-O", dest="level", type=int, default=2)
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--prefill-lens", default="1024")
    p.add_argument(
        "--prefill-repeats",
        type=int,
        default=latency_args([]).prefill_repeats,
        help="timed prefills per length, after a warm-up one (median; default: %(default)s)",
    )
    p.add_argument(
        "--capture-sizes",
        default=None,
        help="CUDA-graph sizes (default: 1,8,64,512 and each --prefill-lens, so that a prefill is "
        "timed as graph replays: uncaptured, it is bound by the host's kernel launches and "
        "follows the host's speed, docs/quantization.md)",
    )
    p.add_argument("--only", default="", help="comma-separated passes to flip (default: all)")
    p.add_argument(
        "--quantization",
        default=None,
        choices=["fp8"],
        help="FP8 weights (its default pipeline has the quantization fusions on)",
    )
    args = p.parse_args()
    if args.capture_sizes is None:
        sizes = {1, 8, 64, 512, *(int(n) for n in args.prefill_lens.split(",") if n)}
        args.capture_sizes = ",".join(map(str, sorted(sizes)))
    import torch

    from compiled_llm.passes.base import PassContext
    from compiled_llm.passes.registry import REQUIRED, builtin_names, get_pass

    env = environment()
    print("config:", json.dumps(vars(args)), json.dumps(env), sep="\n  ")
    latency = os.path.join(os.path.dirname(os.path.abspath(__file__)), "latency.py")
    common = [
        "--shape",
        args.shape,
        "--batch-sizes",
        args.batch_sizes,
        "--decode-steps",
        str(args.decode_steps),
        "--prefill-lens",
        args.prefill_lens,
        "--prefill-repeats",
        str(args.prefill_repeats),
        "--capture-sizes",
        args.capture_sizes,
        "--worker-level",
        str(args.level),
        *(["--quantization", args.quantization] if args.quantization else []),
    ]
    # Only the quantization decides a pass's default; the rest of the context does not.
    ctx = PassContext("cuda", torch.bfloat16, "auto", args.quantization)
    configs = {"default pipeline": ""}
    only = [n for n in args.only.split(",") if n]
    for name in builtin_names():
        if name in REQUIRED or (only and name not in only):
            continue
        on = get_pass(name).on_by_default(ctx)
        configs[f"{'-' if on else '+'}{name}"] = f"{'-' if on else '+'}{name}"
    results = {}
    for label, edit in configs.items():
        results[label] = run_worker(latency, [*common, f"--passes={edit}"])
        if "error" in results[label]:
            print(f"{label} failed:\n{results[label]['error']}")
    base = results["default pipeline"]
    batches = args.batch_sizes.split(",")
    rows = []
    for label, r in results.items():
        if "error" in r:
            continue
        row: list = [label]
        for b in batches:
            s = r["decode_s_per_step"][b]
            row += [s * 1e3, f"{100 * (s / base['decode_s_per_step'][b] - 1):+.1f}%"]
        pre = next(iter(r["prefill_s"].values()))
        row += [pre * 1e3, f"{100 * (pre / next(iter(base['prefill_s'].values())) - 1):+.1f}%"]
        rows.append(row)
    suffix = f"-{args.quantization}" if args.quantization else ""
    path = write_result(
        f"passes-{args.shape}{suffix}", {"config": vars(args), "env": env, "results": results}
    )
    print(f"\nresults: {path}\n")
    headers = ["pipeline"]
    for b in batches:
        headers += [f"decode b={b} ms", "vs default"]
    prefill = f"prefill {args.prefill_lens.split(',')[0]} ms (median of {args.prefill_repeats})"
    headers += [prefill, "vs default"]
    print_table(headers, rows)


if __name__ == "__main__":
    main()
