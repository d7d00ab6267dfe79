"""Offline throughput: compiled-llm's `LLM.generate` against HF transformers on the same prompts,
in the same run.

Workloads (fixed seeds):
  embedded   CPU: the embedded SmolLM2 model, text prompts; peer: HF `generate` (batched, greedy)
  random     --num-prompts requests of --input-len random token ids, --output-len out each
  nano       256 requests, input and output lengths uniform in 100..1024, seed 0 (nano-vllm's)
  1024-128   --num-prompts requests of 1024 in / 128 out
Model shapes other than the embedded model come from config dicts with random weights made on
the device (benchmarks/shapes.py); the GPU peer is HF's continuous-batching `generate_batch`.

With --repeats N our engine runs the workload N times (fresh random token ids each time, same
lengths) and reports the median; the peer runs it once.

  python benchmarks/throughput.py --workload embedded              # CPU, README's figure
  python benchmarks/throughput.py --shape llama-3.1-8b --workload random --input-len 256 \\
      --output-len 256 --num-prompts 1000 --peer-prompts 128
  python benchmarks/throughput.py --shape llama-3.1-8b --workload random --input-len 256 \\
      --output-len 256 --num-prompts 1000 --no-peer --quantization fp8
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import environment, print_table, run_worker, write_result  # noqa: E402
from shapes import SHAPES, shape_folder  # noqa: E402

EMBEDDED_PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain what a compiler does in one paragraph.",
    "List three uses of a paged KV cache:",
    "Once upon a time, in a small village by the mountains,",
    "The main differences between Python and C are",
    "Q: What is 12 times 7?\nA:",
    "A good breakfast consists of",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--workload", default="embedded", choices=["embedded", "random", "nano", "1024-128"]
    )
    p.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument(
        "--peer-prompts", type=int, default=None, help="prompts for the peer (default all)"
    )
    p.add_argument("--no-peer", action="store_true")
    p.add_argument(
        "--repeats", type=int, default=1, help="timed runs of our engine (median); not embedded"
    )
    p.add_argument("--embedded-repeats", type=int, default=4, help="embedded: prompt list repeats")
    p.add_argument("--embedded-output-len", type=int, default=64)
    p.add_argument("--engine-args", default="{}", help="JSON dict of extra LLM(...) arguments")
    p.add_argument(
        "--quantization", default=None, choices=["fp8"], help="quantize our engine's weights"
    )
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    p.add_argument(
        "--step-timeline",
        action="store_true",
        help="record each engine step's tokens and wall time (last run), summarized by step kind",
    )
    p.add_argument("--worker", choices=["ours", "peer"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1 or (args.repeats > 1 and args.workload == "embedded"):
        p.error("--repeats must be >= 1, and 1 for the embedded workload (fixed prompts)")
    return args


def workload(args: argparse.Namespace, vocab: int, repeat: int = 0) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) per request; repeats keep the lengths and draw new ids,
    so a later run gets no prefix-cache hits from an earlier one."""
    rng = random.Random(0)
    if args.workload == "nano":
        lens = [(rng.randint(100, 1024), rng.randint(100, 1024)) for _ in range(256)]
    elif args.workload == "1024-128":
        lens = [(1024, 128)] * args.num_prompts
    else:
        lens = [(args.input_len, args.output_len)] * args.num_prompts
    if repeat:
        rng = random.Random(repeat)
    return [([rng.randrange(vocab) for _ in range(i)], o) for i, o in lens]


def run_ours(args: argparse.Namespace) -> dict:
    from compiled_llm import LLM, SamplingParams

    extra = json.loads(args.engine_args)
    if args.quantization:
        extra["quantization"] = args.quantization
    extra.setdefault("kv_cache_dtype", args.kv_cache_dtype)
    start = time.perf_counter()
    if args.workload == "embedded":
        llm = LLM(**extra)
        prompts = EMBEDDED_PROMPTS * args.embedded_repeats
        params = SamplingParams(temperature=0, max_tokens=args.embedded_output_len, ignore_eos=True)
        startup = time.perf_counter() - start
        outs, seconds, steps = timed_generate(llm, prompts, params, args.step_timeline)
        runs = [seconds]
    else:
        vocab = int(SHAPES[args.shape]["vocab_size"])
        reqs = workload(args, vocab)
        longest = max(len(p) + o for p, o in reqs)
        llm = LLM(
            shape_folder(args.shape),
            load_format="dummy",
            skip_tokenizer_init=True,
            max_model_len=max(longest, 2048),
            **extra,
        )
        startup = time.perf_counter() - start
        runs = []
        for repeat in range(args.repeats):
            reqs = workload(args, vocab, repeat)
            prompts = [{"prompt_token_ids": p} for p, _ in reqs]
            params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in reqs]
            outs, seconds, steps = timed_generate(llm, prompts, params, args.step_timeline)
            runs.append(seconds)
    n_in = sum(len(o.prompt_token_ids) for o in outs)
    n_out = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {
        "startup_s": startup,
        "seconds": statistics.median(runs),
        "runs_s": runs,
        "requests": len(outs),
        "input_tokens": n_in,
        "output_tokens": n_out,
        **({"step_timeline": summarize_steps(steps)} if args.step_timeline else {}),
    }


def timed_generate(
    llm: Any, prompts: list[Any], params: Any, step_timeline: bool
) -> tuple[list[Any], float, list[tuple[int, int, float]]]:
    """`llm.generate`'s outputs and wall time, and with `step_timeline` its steps."""
    timeline = StepTimeline(llm.engine) if step_timeline else None
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return outs, seconds, timeline.stop() if timeline is not None else []


class StepTimeline:
    """Each `LLMEngine.step` call's wall time and the tokens of the step it scheduled (prompt
    tokens computed, all tokens computed). With async scheduling a call launches its step and then
    waits for the previous one's tokens, so a call's wall time is mostly the previous step's
    GPU time: `summarize_steps` charges call i + 1's time to step i."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.steps: list[tuple[int, int, float]] = []
        step = engine.step

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = step(*args, **kwargs)
            stats = engine.last_stats
            prompt, tokens = (
                (stats.num_prompt_tokens_computed, stats.num_scheduled_tokens) if stats else (0, 0)
            )
            self.steps.append((prompt, tokens, time.perf_counter() - start))
            return out

        engine.step = timed

    def stop(self) -> list[tuple[int, int, float]]:
        del self.engine.step  # the instance attribute; the class's method again
        return self.steps


# Step kinds by tokens: decode only (no prompt tokens), and steps with prompt tokens by size
# against the largest piecewise CUDA graph of the default sizes (512).
STEP_KINDS = ((0, "decode only"), (512, "prefill/mixed <= 512"), (2048, "513-2048"))


def summarize_steps(steps: list[tuple[int, int, float]]) -> dict[str, Any]:
    kinds: dict[str, dict[str, float]] = {}
    for (prompt, tokens, _), (_, _, wall) in zip(steps, steps[1:]):
        kind = "2049+"
        if prompt == 0:
            kind = STEP_KINDS[0][1]
        else:
            kind = next((name for limit, name in STEP_KINDS[1:] if tokens <= limit), kind)
        k = kinds.setdefault(kind, {"steps": 0, "seconds": 0.0, "tokens": 0})
        k["steps"] += 1
        k["seconds"] += wall
        k["tokens"] += tokens
    for k in kinds.values():
        k["ms_per_step"] = 1000 * k["seconds"] / k["steps"]
        k["tokens_per_step"] = k["tokens"] / k["steps"]
    return {"kinds": kinds, "steps": [[p, s, round(w * 1e6)] for p, s, w in steps]}


def run_peer(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    cuda = torch.cuda.is_available()
    if args.workload == "embedded":
        from compiled_llm.models.loader import default_model_path, gguf_side_folder, iterate_gguf

        path = default_model_path()
        folder = gguf_side_folder(path)
        config = AutoConfig.from_pretrained(folder)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        names = [n for n, _ in model.named_parameters()]
        model.load_state_dict(dict(iterate_gguf(path, config, names)), strict=False)
        tok = AutoTokenizer.from_pretrained(folder)
        tok.padding_side = "left"
        prompts = EMBEDDED_PROMPTS * args.embedded_repeats
        batch = tok(prompts, return_tensors="pt", padding=True)
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **batch,
                max_new_tokens=args.embedded_output_len,
                min_new_tokens=args.embedded_output_len,
                do_sample=False,
                pad_token_id=tok.pad_token_id or 0,
            )
        elapsed = time.perf_counter() - t
        n_out = (out.shape[1] - batch.input_ids.shape[1]) * out.shape[0]
        return {
            "seconds": elapsed,
            "requests": len(prompts),
            "output_tokens": n_out,
            "input_tokens": int(batch.attention_mask.sum()),
        }
    config = AutoConfig.from_pretrained(shape_folder(args.shape))
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    reqs = workload(args, int(config.vocab_size))[: args.peer_prompts]
    gen = GenerationConfig(
        max_new_tokens=max(o for _, o in reqs), do_sample=False, eos_token_id=-1, pad_token_id=0
    )
    # One continuous-batching manager for all requests, each with its own output length (one
    # `generate_batch` per length would serialize workloads such as 'nano').
    manager = model.init_continuous_batching(generation_config=gen)
    manager.start()
    t = time.perf_counter()
    n_out = 0
    try:
        for p, o in reqs:
            manager.add_request(p, max_new_tokens=o)
        for _ in reqs:
            result = manager.get_result(timeout=600)
            if result is None:
                raise TimeoutError("HF continuous batching returned no result in 600 s")
            n_out += len(result.generated_tokens)
    finally:
        manager.stop(block=True)
    elapsed = time.perf_counter() - t
    return {
        "seconds": elapsed,
        "requests": len(reqs),
        "output_tokens": n_out,
        "input_tokens": sum(len(p) for p, _ in reqs),
    }


def main() -> None:
    args = parse_args()
    if args.worker == "ours":
        print(json.dumps(run_ours(args)))
        return
    if args.worker == "peer":
        print(json.dumps(run_peer(args)))
        return
    env = environment()
    print("config:", json.dumps(vars(args)), json.dumps(env), sep="\n  ")
    script = os.path.abspath(__file__)
    results = {"compiled-llm": run_worker(script, sys.argv[1:] + ["--worker", "ours"])}
    if not args.no_peer:
        results["hf-transformers"] = run_worker(script, sys.argv[1:] + ["--worker", "peer"])
    rows = []
    for name, r in results.items():
        if "error" in r:
            print(f"{name} failed:\n{r['error']}")
            continue
        r["output_tok_s"] = r["output_tokens"] / r["seconds"]
        r["total_tok_s"] = (r["output_tokens"] + r["input_tokens"]) / r["seconds"]
        rows.append([name, r["requests"], r["seconds"], r["output_tok_s"], r["total_tok_s"]])
    ours, peer = results["compiled-llm"], results.get("hf-transformers", {})
    if "output_tok_s" in ours and "output_tok_s" in peer:
        ratio = ours["output_tok_s"] / peer["output_tok_s"]
        results["ratio_output_tok_s"] = ratio
    name = f"throughput-{args.workload}"
    if args.workload != "embedded":
        name += f"-{args.shape}"
    if args.quantization:
        name += f"-{args.quantization}"
    if args.kv_cache_dtype == "fp8":
        name += "-kv-fp8"
    path = write_result(name, {"config": vars(args), "env": env, "results": results})
    print(f"\nresults: {path}\n")
    print_table(["engine", "requests", "seconds", "output tok/s", "total tok/s"], rows)
    timeline = results["compiled-llm"].get("step_timeline")
    if timeline:
        print("\nsteps of the last run (a call's wall time charged to the step before it):")
        print_table(
            ["kind", "steps", "seconds", "ms/step", "tokens/step"],
            [
                [name, k["steps"], k["seconds"], k["ms_per_step"], k["tokens_per_step"]]
                for name, k in timeline["kinds"].items()
            ],
        )
    runs = results["compiled-llm"].get("runs_s", [])
    if len(runs) > 1:
        print(f"\ncompiled-llm: median of {len(runs)} runs ({min(runs):.2f}-{max(runs):.2f} s)")
    if "ratio_output_tok_s" in results:
        print(
            f"\ncompiled-llm / HF transformers (output tok/s): {results['ratio_output_tok_s']:.2f}x"
        )


if __name__ == "__main__":
    main()
