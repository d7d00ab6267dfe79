"""Where a decode step's time goes: GPU time per kernel per step, and GPU idle, from a
torch-profiler trace of a few engine steps.

Builds the engine (random weights from a config dict, benchmarks/shapes.py), starts `--batch`
decode requests, profiles `--steps` steps and groups the trace's kernels by name (kernels inside
CUDA-graph replays included). On CPU it groups the top-level aten ops instead (there are no
kernels). `--trace FILE` only analyses a trace written earlier (by this script, the latency
benchmark or `--profile-dir`).

On CUDA it also reports the host side: time per step inside each CUDA runtime call (a call that
blocks, such as a copy from pageable memory that waits for the stream, shows up here), the
copies by kind (pageable or pinned), and every GPU gap over 20 us charged to the runtime call
that launched the work ending it and the top-level op the host was running it from.

  python benchmarks/step_kernels.py --shape llama-3.1-8b --batch 1
  python benchmarks/step_kernels.py --trace benchmarks/results/kernels-b1-trace.json --steps 20
  python benchmarks/step_kernels.py --shape tiny --steps 2   # CPU smoke run
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import re
import sys
from collections import defaultdict
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    RESULTS,
    environment,
    idle_fraction,
    idle_split,
    kernel_spans,
    print_table,
    write_result,
)
from shapes import SHAPES, shape_folder  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=1, help="decode requests running together")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="decode steps profiled")
    p.add_argument("--top", type=int, default=20, help="rows of the table")
    p.add_argument("--trace", default=None, help="analyse this Chrome trace instead of running")
    p.add_argument("--engine-args", default="{}", help="JSON dict of extra LLM(...) arguments")
    return p.parse_args()


def profile(args: argparse.Namespace) -> str:
    """Run the engine and write a trace of `args.steps` decode steps; returns its path."""
    import torch

    from compiled_llm import LLM, SamplingParams

    cuda = torch.cuda.is_available()
    llm = LLM(
        shape_folder(args.shape),
        load_format="dummy",
        skip_tokenizer_init=True,
        max_model_len=max(2048, 2 * (args.prompt_len + args.steps + 16)),
        max_num_seqs=max(args.batch, 1),
        enable_prefix_caching=False,
        kv_cache_memory_bytes=None if cuda else 1 << 28,
        **json.loads(args.engine_args),
    )
    engine = llm.engine
    vocab = int(engine.config.model_config.hf_config.vocab_size)
    rng = random.Random(0)
    # Prefill takes this many steps at most; requests prefilled first decode meanwhile.
    budget = engine.config.scheduler_config.max_num_batched_tokens
    prefill_steps = -(-args.batch * args.prompt_len // budget) + 1
    warm = 8
    params = SamplingParams(
        temperature=0, max_tokens=prefill_steps + warm + args.steps + 8, ignore_eos=True
    )
    for i in range(args.batch):
        prompt = {"prompt_token_ids": [rng.randrange(vocab) for _ in range(args.prompt_len)]}
        engine.add_request(f"r{i}", prompt, params)
    for _ in range(prefill_steps):  # until every prompt is in (a step with no prompt tokens)
        engine.step()
        stats = engine.last_stats
        if stats is not None and stats.num_prompt_tokens_computed == 0 and not stats.num_waiting:
            break
    for _ in range(warm):  # warm decode steps
        engine.step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            engine.step()
        if cuda:
            torch.cuda.synchronize()
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name(args)}-trace.json")
    prof.export_chrome_trace(path)
    return path


def name(args: argparse.Namespace) -> str:
    """The results' name: shape, batch, and the engine arguments as a slug (FP8 and bf16 runs
    of one shape write different traces)."""
    extra = re.sub(r"[^A-Za-z0-9.]+", "-", args.engine_args).strip("-")[:48]
    return f"kernels-{args.shape}-b{args.batch}" + (f"-{extra}" if extra else "")


def top_level(spans: list[tuple]) -> list[tuple]:
    """Spans not nested in an earlier one (for CPU ops, which nest)."""
    out: list[tuple] = []
    end = float("-inf")
    for span in spans:
        if span[0] >= end:
            out.append(span)
            end = span[1]
    return out


def _per_step(counts: dict[str, list[float]], steps: int) -> list[dict[str, Any]]:
    return [
        {"name": n, "calls_per_step": c / steps, "us_per_step": d / steps}
        for n, (c, d) in sorted(counts.items(), key=lambda item: -item[1][1])
    ]


def host_side(events: list[dict[str, Any]], steps: int, long_gap_us: float = 20.0) -> dict:
    """The host's part in a CUDA trace: runtime calls (host time inside each, per step), GPU
    copies and memsets by name (the name says pageable or pinned), and the long gaps between GPU
    work (kernels, copies, memsets; over `long_gap_us`: the device waiting for the host), each
    charged to "<runtime call> in <the top-level op of its thread it ran in>" of the launch that
    ended it (GPU work carries the correlation id of the runtime call that launched it; graph
    replays: cudaGraphLaunch)."""
    runtime = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver") and "dur" in e]
    calls: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in runtime:
        calls[e["name"]][0] += 1
        calls[e["name"]][1] += e["dur"]
    launcher = {e["args"]["correlation"]: e for e in runtime if "correlation" in e.get("args", {})}
    device = sorted(
        (e["ts"], e["ts"] + e["dur"], e["cat"], e.get("args", {}).get("correlation"), e["name"])
        for e in events
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e
    )
    copies: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for start, end, cat, _, name in device:
        if cat != "kernel":
            copies[name][0] += 1
            copies[name][1] += end - start
    ops_by_thread: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        if e.get("cat") == "cpu_op" and "dur" in e:
            ops_by_thread[e.get("tid")].append(e)
    ops = {tid: top_level(kernel_spans(evs, "cpu_op")) for tid, evs in ops_by_thread.items()}
    gaps: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    if device:
        last_end = device[0][1]
        for start, end, _, correlation, _ in device[1:]:
            gap = start - last_end
            if gap > long_gap_us:
                call = launcher.get(correlation)
                where = "?"
                if call is not None:
                    thread = ops.get(call.get("tid"), [])
                    i = bisect.bisect_right(thread, (call["ts"], float("inf"))) - 1
                    inside = i >= 0 and thread[i][1] >= call["ts"]
                    where = thread[i][2] if inside else "no op (Python)"
                key = f"{call['name'] if call else 'unknown launch'} in {where}"
                gaps[key][0] += 1
                gaps[key][1] += gap
            last_end = max(last_end, end)
    return {
        "runtime_calls": _per_step(calls, steps),
        "copies": _per_step(copies, steps),
        "long_gaps_by_launch": _per_step(gaps, steps),
    }


def summarize(events: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    spans = kernel_spans(events, "kernel")
    category = "kernel"
    if not spans:
        spans, category = top_level(kernel_spans(events, "cpu_op")), "cpu_op"
    by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for start, end, name in spans:
        entry = by_name[name]
        entry[0] += 1
        entry[1] += end - start
    rows = [
        {"name": n, "calls_per_step": c / steps, "us_per_step": d / steps, "us_per_call": d / c}
        for n, (c, d) in sorted(by_name.items(), key=lambda item: -item[1][1])
    ]
    between_launches, within_launches = idle_split(spans)
    return {
        "category": category,
        "steps": steps,
        "busy_us_per_step": sum(r["us_per_step"] for r in rows),
        "idle_fraction": idle_fraction(spans),
        "idle_long_gaps": between_launches,  # gaps > 20 us: waiting for the host
        "idle_short_gaps": within_launches,  # the rest: between queued kernels (graph replays)
        "rows": rows,
        **(host_side(events, steps) if category == "kernel" else {}),
    }


def main() -> None:
    args = parse_args()
    env = environment()
    print("config:", json.dumps(vars(args)), json.dumps(env), sep="\n  ")
    trace = args.trace or profile(args)
    with open(trace) as f:
        summary = summarize(json.load(f)["traceEvents"], args.steps)
    summary["trace"] = trace
    path = write_result(name(args), {"config": vars(args), "env": env, **summary})
    print(f"\ntrace: {trace}\nresults: {path}\n")
    print(
        f"{summary['category']} time per step: {summary['busy_us_per_step']:.1f} us; "
        f"idle {100 * summary['idle_fraction']:.1f}% of the window: "
        f"{100 * summary['idle_long_gaps']:.1f}% in gaps > 20 us (waiting for the host), "
        f"{100 * summary['idle_short_gaps']:.1f}% between queued kernels"
    )
    rows = [
        [r["name"][:70], r["calls_per_step"], r["us_per_step"], r["us_per_call"]]
        for r in summary["rows"][: args.top]
    ]
    print_table(["name", "calls/step", "us/step", "us/call"], rows)
    for key, title in (
        ("runtime_calls", "host time in CUDA runtime calls"),
        ("copies", "GPU copies and memsets"),
        ("long_gaps_by_launch", "GPU gaps > 20 us, by the launch that ended them"),
    ):
        if summary.get(key):
            print(f"\n{title} (per step):")
            table = [[r["name"][:70], r["calls_per_step"], r["us_per_step"]] for r in summary[key]]
            print_table(["name", "calls/step", "us/step"], table[: args.top])


if __name__ == "__main__":
    main()
