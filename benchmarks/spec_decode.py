"""Speculative decoding: decode tok/s with and without it, per batch size.

Two workloads, each timed as decode only (from every request's first token to the last):

  oracle (default; any --shape, random weights): n-gram gains need real text, which random
    weights never produce, so this measures what verification costs and gains at a *set*
    acceptance. The random target is made predictable first (its greedy next token becomes
    f(current token) for a fixed permutation f, by in-place edits of the embedding, output head
    and the layers' output projections: the same shapes, the same work per step), and the drafts
    are f's chain with each token kept with probability p and otherwise replaced by a wrong one.
    That is an honest stand-in for a trained draft model with per-token acceptance p, stated as
    such in the output; --accept-probs lists the p's.
  ngram (--model PATH, or "embedded" for the bundled SmolLM2-135M-Instruct): the real n-gram
    proposer, greedy, on chat prompts that quote their context (repeat, fix, edit a given text),
    against the same engine without speculation; the outputs are compared token for token.
  draft_model (--shape and --draft-shape, random weights): the real draft-model proposer, so the
    draft's k decode steps (its compiled forward, CUDA graphs, KV cache) are timed too. Random
    weights agree on nothing, so both models are edited as in oracle: the target to follow a
    permutation f, the draft to follow f too (--accept-probs 1: nearly every draft accepted) or
    another permutation (0: nearly none). Only those two acceptance levels are available; what
    the draft's cost does to the speedup at either end is what this measures.
  eagle3 (--shape, random weights): the real EAGLE-3 proposer with a random-weight head of the
    published layout for the shape (one layer, draft vocabulary 32000; benchmarks/shapes.py):
    the target's layer taps, the head's fc per step, its k steps. A random head's drafts are
    almost never accepted, so only --accept-probs 0 is available: the row is the cost of
    drafting with EAGLE-3 when it gains nothing.

  python benchmarks/spec_decode.py --shape llama-3.1-8b --batch-sizes 1,8,64 --k 4 \\
      --accept-probs 0,0.5,0.8,1
  python benchmarks/spec_decode.py --workload ngram --model embedded --batch-sizes 1 --k 4  # CPU
  python benchmarks/spec_decode.py --workload draft_model --shape llama-3.1-8b \
      --draft-shape llama-3.2-1b --batch-sizes 1,8,64 --k 4 --accept-probs 0,1
  python benchmarks/spec_decode.py --workload eagle3 --shape llama-3.1-8b --batch-sizes 1,8,64 \
      --k 4 --accept-probs 0
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

from common import (  # noqa: E402
    cprofile_text,
    environment,
    print_table,
    profile_engine_steps,
    run_worker,
    write_result,
)
from shapes import SHAPES, eagle3_head_folder, shape_folder  # noqa: E402

# Chat prompts whose answers quote their own context (the n-gram proposer's case).
TEXT = (
    "The committee met on Tuesday to review the budget for the coming year. After a long "
    "discussion, the members agreed to increase funding for the public library by ten percent, "
    "to repair the bridge over the river before the winter, and to hire two new teachers for "
    "the primary school. The proposal to build a new parking lot was postponed until spring."
)
CODE = (
    "def total_price(items, tax_rate):\n"
    "    total = 0\n"
    "    for item in items:\n"
    "        total = total + item.price * item.quantity\n"
    "    total = total * (1 + tax_rate)\n"
    "    return round(total, 2)\n"
)
NGRAM_PROMPTS = [
    f"Repeat the following text exactly, word for word:\n\n{TEXT}",
    f"Rewrite this text, changing only 'Tuesday' to 'Friday':\n\n{TEXT}",
    f"Rename the function total_price to compute_total in this code and show the whole code:"
    f"\n\n{CODE}",
    f"Copy this paragraph and then summarize it in one sentence:\n\n{TEXT}",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--workload", choices=("oracle", "ngram", "draft_model", "eagle3"), default="oracle"
    )
    p.add_argument(
        "--shape", default="llama-3.1-8b", choices=sorted(SHAPES), help="oracle, draft_model"
    )
    p.add_argument(
        "--draft-shape", default="llama-3.2-1b", choices=sorted(SHAPES), help="draft_model"
    )
    p.add_argument("--model", default="embedded", help="ngram: a model folder, or embedded")
    p.add_argument("--batch-sizes", default="1,8,64")
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    p.add_argument(
        "--accept-probs",
        default="0,0.5,0.8,1",
        help="oracle: per-token p's; draft_model: 0 and/or 1 (the draft follows another "
        "permutation, or the target's)",
    )
    p.add_argument("--prompt-len", type=int, default=64, help="oracle: prompt tokens")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens generated per request")
    p.add_argument("--prompt-lookup-min", type=int, default=2, help="ngram")
    p.add_argument("--prompt-lookup-max", type=int, default=5, help="ngram")
    p.add_argument(
        "--disable-by-batch-size",
        default="32",
        help="speculative_config's (the engine default); 'none' speculates at any batch",
    )
    p.add_argument(
        "--draft-token-cost",
        type=float,
        default=None,
        help="speculative_config's adaptive-k price of a draft (default: the engine's); 0: off",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point (median)")
    p.add_argument(
        "--oracle-seed",
        type=int,
        default=0,
        help="oracle: the seed of which drafts are kept (middling p's vary with it)",
    )
    p.add_argument(
        "--cprofile",
        type=int,
        default=0,
        metavar="N",
        help="one more (untimed) decode run per point under cProfile; print its N costliest "
        "functions by own time (where a step's host time goes)",
    )
    p.add_argument(
        "--profile-steps",
        type=int,
        default=16,
        help="CUDA: decode steps of one more (untimed) run per point under the torch profiler, "
        "for the GPU busy ms/step and idle columns (0: skip)",
    )
    p.add_argument("-O", "--compilation-level", type=int, default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument(
        "--attention-backend",
        default="auto",
        help="attention backend of both engines (auto, flashinfer, triton, torch)",
    )
    p.add_argument("--no-async-scheduling", action="store_true")
    p.add_argument("--worker", choices=("base", "spec", "both"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


class OracleProposer:
    """The stand-in draft: the target's own next tokens (f's chain from the newest token), each
    kept with probability `p` and otherwise replaced by a token the target will not pick."""

    def __init__(self, f: list[int], p: float, seed: int = 0) -> None:
        self.f, self.p, self.rng = f, p, random.Random(seed)

    def propose(self, requests: list[Any], max_drafts: list[int]) -> list[list[int]]:
        out = []
        for r, k in zip(requests, max_drafts):
            drafts, t = [], r.all_token_ids[-1]
            for _ in range(k):
                t = self.f[t]
                drafts.append(t if self.rng.random() < self.p else self.f[t])
            out.append(drafts)
        return out


def make_predictable(model: Any, seed: int = 0) -> list[int]:
    """Edit random weights in place so that the greedy next token is f(current token) by a wide
    margin: embedding rows are random directions of norm 100, the output head's row f(x) is row
    x's direction, the layers' output projections shrink 100x (their contribution stays small
    next to the embedding) and norms are 1. Returns f."""
    import torch

    params = dict(model.named_parameters())
    emb = next(v for n, v in params.items() if n.endswith("embed_tokens.weight"))
    head = params.get("lm_head.weight")
    if head is None:
        raise SystemExit("the oracle workload needs a shape with untied embeddings (an lm_head)")
    vocab = emb.shape[0]
    f = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator(device=emb.device).manual_seed(seed)
    with torch.no_grad():
        rows = torch.randn(emb.shape, generator=g, device=emb.device, dtype=torch.float32)
        rows /= rows.norm(dim=1, keepdim=True)
        emb.copy_(rows * 100)
        head.copy_(rows[torch.argsort(f).to(emb.device)])  # row f(x) = direction of x
        for name, v in params.items():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                v.mul_(0.01)
            elif "norm" in name:
                v.fill_(1.0)
    return f.tolist()


def build(args: argparse.Namespace, speculative: bool) -> tuple[Any, list[int], list[Any]]:
    """An engine (with the n-gram proposer when `speculative`), the oracle's f (predictable
    target) and the prompts."""
    import torch

    from compiled_llm import LLM

    cuda = torch.cuda.is_available()
    batches = _ints(args.batch_sizes)
    spec = None
    if speculative:
        limit = args.disable_by_batch_size
        spec = {
            "method": "ngram",
            "num_speculative_tokens": args.k,
            "prompt_lookup_min": args.prompt_lookup_min,
            "prompt_lookup_max": args.prompt_lookup_max,
            "disable_by_batch_size": None if limit == "none" else int(limit),
        }
        if args.draft_token_cost is not None:
            spec["draft_token_cost"] = args.draft_token_cost
        if args.workload == "draft_model":
            del spec["prompt_lookup_min"], spec["prompt_lookup_max"]
            spec.update(method="draft_model", model=shape_folder(args.draft_shape))
        if args.workload == "eagle3":
            del spec["prompt_lookup_min"], spec["prompt_lookup_max"]
            spec.update(method="eagle3", model=eagle3_head_folder(args.shape))
    engine_args: dict[str, Any] = dict(
        max_num_seqs=max(batches),
        enable_prefix_caching=False,
        compilation_level=args.compilation_level,
        dtype=args.dtype,
        attention_backend=args.attention_backend,
        async_scheduling=not args.no_async_scheduling,
        speculative_config=spec,
        kv_cache_memory_bytes=None if cuda else 1 << 28,
    )
    if args.workload != "ngram":
        engine_args.update(load_format="dummy", skip_tokenizer_init=True)
        engine_args.update(max_model_len=args.prompt_len + args.max_tokens + 64)
        llm = LLM(shape_folder(args.shape), **engine_args)
        f = make_predictable(llm.engine.core.runner.model)
        rng = random.Random(0)
        prompts: list[Any] = [
            {"prompt_token_ids": [rng.randrange(len(f)) for _ in range(args.prompt_len)]}
            for _ in range(max(batches))
        ]
        return llm, f, prompts
    engine_args.update(max_model_len=2048)
    llm = LLM(None if args.model == "embedded" else args.model, **engine_args)
    tok = llm.get_tokenizer()
    prompts = [
        {
            "prompt_token_ids": list(
                tok.apply_chat_template(
                    [{"role": "user", "content": text}],
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=False,
                )
            )
        }
        for text in NGRAM_PROMPTS
    ]
    return llm, [], prompts


def decode_run(
    args: argparse.Namespace,
    llm: Any,
    f: list[int],
    prompts: list[Any],
    b: int,
    label: str,
    profile_steps: int = 0,
) -> dict[str, Any]:
    """Decode b requests at a time (oracle: b requests; ngram: every prompt, b at a time),
    timed from every request's first token to the last. With `profile_steps` (CUDA), the first
    that many decode steps run under the torch profiler instead (a run to read the profile of,
    not to time): the GPU's busy time per step and its idle share of the window."""
    import torch

    from compiled_llm import SamplingParams

    oracle = args.workload != "ngram"  # random-weight shapes made predictable
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=oracle)
    groups = (
        [list(range(b))]
        if oracle
        else [list(range(i, min(i + b, len(prompts)))) for i in range(0, len(prompts), b)]
    )
    seconds = 0.0
    steps = tokens = drafted = accepted = spec_steps = 0
    follows: list[float] = []
    token_ids: list[list[int]] = []
    step_ms: list[float] = []  # host time of each timed engine.step() call
    profile: dict[str, float] = {}
    for g, indices in enumerate(groups):
        ids = [f"{label}-{g}-{i}" for i in indices]
        for i, rid in zip(indices, ids):
            engine.add_request(rid, prompts[i % len(prompts)], params)
        latest: dict[str, Any] = {}
        t0 = n0 = None
        last = 0.0
        while engine.has_unfinished_requests():
            for out in engine.step():
                latest[out.request_id] = out
            if t0 is not None:
                steps += 1
                now = time.perf_counter()
                step_ms.append(1e3 * (now - last))
                last = now
            elif len(latest) == len(ids) and all(o.outputs[0].token_ids for o in latest.values()):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                t0 = last = time.perf_counter()
                n0 = sum(len(o.outputs[0].token_ids) for o in latest.values())
                if profile_steps and not profile:
                    profile = profile_decode(engine, latest, profile_steps)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds += time.perf_counter() - (t0 or 0.0)
        outs = [latest[rid] for rid in ids]
        tokens += sum(len(o.outputs[0].token_ids) for o in outs) - (n0 or 0)
        for o in outs:
            t = o.outputs[0].token_ids
            token_ids.append(t)
            m = o.metrics.spec_decode
            if m is not None:
                drafted += m.num_draft_tokens
                accepted += m.num_accepted_draft_tokens
                spec_steps += m.num_spec_steps
            if oracle:
                follows.append(sum(f[a] == c for a, c in zip(t, t[1:])) / max(1, len(t) - 1))
    return {
        "tok_s": tokens / seconds,
        "ms_per_step": 1e3 * seconds / max(steps, 1),
        # the mean above hides whether every step is dearer or a few stall (a GC pause, a
        # recompile, an allocation): the median and the slowest call tell them apart
        "ms_per_step_p50": statistics.median(step_ms) if step_ms else None,
        "ms_per_step_max": max(step_ms) if step_ms else None,
        "decode_tokens": tokens,
        "decode_steps": steps,
        "acceptance": accepted / drafted if drafted else None,
        "mean_acceptance_length": 1 + accepted / spec_steps if spec_steps else None,
        "target_follows_f": min(follows) if follows else None,
        "token_ids": None if oracle else token_ids,
        **profile,
    }


def profile_decode(engine: Any, latest: dict[str, Any], steps: int) -> dict[str, float]:
    """Up to `steps` engine steps under the profiler (`profile_engine_steps`). A verify step
    that is slower with async scheduling than without is dearer on the GPU (busy ms) or waits
    on the host (idle)."""

    def record(outputs: list[Any]) -> None:
        for out in outputs:
            latest[out.request_id] = out

    busy, idle = profile_engine_steps(engine, steps, record)
    return {"gpu_busy_ms": busy, "gpu_idle": idle}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median tok/s, with every run's tok/s."""
    ordered = sorted(runs, key=lambda r: float(r["tok_s"]))
    return {**ordered[len(ordered) // 2], "tok_s_runs": [r["tok_s"] for r in runs]}


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """oracle: one engine (--worker base or spec) per process. ngram: both engines in one
    process (--worker both), their timed runs interleaved, so that a busy shared CPU slows both
    alike."""
    batches = _ints(args.batch_sizes)
    kinds = ["base", "spec"] if args.worker == "both" else [args.worker]
    start = time.perf_counter()
    engines = {kind: build(args, kind == "spec") for kind in kinds}
    startup_s = time.perf_counter() - start
    results: dict[str, dict[str, Any]] = {kind: {} for kind in kinds}
    for b in batches:
        if "spec" in engines and args.workload != "ngram":
            llm, f, prompts = engines["spec"]
            for p in [float(x) for x in args.accept_probs.split(",") if x]:
                if args.workload == "oracle":
                    llm.engine.core.spec.proposer = OracleProposer(f, p, args.oracle_seed)
                elif args.workload == "eagle3":
                    if p != 0.0:
                        raise SystemExit("eagle3: --accept-probs takes 0 only (a random head)")
                elif p in (0.0, 1.0):  # the draft follows f (seed 0), or another permutation
                    draft = llm.engine.core.runner.draft
                    make_predictable(draft.model, seed=0 if p == 1.0 else 1)
                else:
                    raise SystemExit("draft_model: --accept-probs takes 0 and 1 only")
                decode_run(args, llm, f, prompts, b, f"warm{b}p{p}")
                timed = [
                    decode_run(args, llm, f, prompts, b, f"b{b}p{p}r{r}")
                    for r in range(args.repeats)
                ]
                results["spec"][f"{b}:{p}"] = {
                    **median_run(timed),
                    **profiled(args, llm, f, prompts, b, f"prof{b}p{p}"),
                }
            continue
        for llm, f, prompts in engines.values():
            decode_run(args, llm, f, prompts, b, f"warm{b}")  # warms every shape it meets
        runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
        for r in range(args.repeats):
            for kind, (llm, f, prompts) in engines.items():
                runs[kind].append(decode_run(args, llm, f, prompts, b, f"b{b}r{r}"))
        for kind in kinds:
            llm, f, prompts = engines[kind]
            results[kind][f"{b}:-"] = {
                **median_run(runs[kind]),
                **profiled(args, llm, f, prompts, b, f"prof{b}"),
            }
    return {"startup_s": startup_s, **results}


def profiled(
    args: argparse.Namespace, llm: Any, f: list[int], prompts: list[Any], b: int, label: str
) -> dict[str, Any]:
    """The profile columns of one point, from an extra untimed run (none without CUDA); with
    --cprofile, first the host profile of another."""
    import torch

    columns: dict[str, Any] = {}
    if args.cprofile:
        run = lambda: decode_run(args, llm, f, prompts, b, f"c{label}")  # noqa: E731
        columns["cprofile"] = cprofile_text(run, args.cprofile)
    if args.profile_steps and torch.cuda.is_available():
        run = decode_run(args, llm, f, prompts, b, label, profile_steps=args.profile_steps)
        columns.update({k: run[k] for k in ("gpu_busy_ms", "gpu_idle") if k in run})
    return columns


def main() -> None:
    args = parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args)))
        return
    env = environment()
    print("config:", json.dumps(vars(args)), json.dumps(env), sep="\n  ")
    if args.workload == "oracle":
        print(
            "oracle workload: drafts are the target's own next tokens kept with probability p "
            "(a stand-in for a trained draft model), on a random-weight target edited to be "
            "predictable"
        )
    if args.workload == "draft_model":
        print(
            f"draft_model workload: a {args.draft_shape} draft model drafts for a {args.shape} "
            "target, both random weights edited to follow a permutation: the target's (p=1, "
            "nearly all drafts accepted) or another (p=0, nearly none)"
        )
    script, argv = os.path.abspath(__file__), sys.argv[1:]
    if args.workload == "eagle3":
        print(
            f"eagle3 workload: a random-weight EAGLE-3 head drafts for a {args.shape} target "
            "(random weights edited to follow a permutation): nearly no draft is accepted, the "
            "row is the cost of drafting"
        )
    if args.workload == "ngram":
        runs = {"both": run_worker(script, [*argv, "--worker", "both"])}
    else:
        runs = {kind: run_worker(script, [*argv, "--worker", kind]) for kind in ("base", "spec")}
    for kind, run in runs.items():
        if "error" in run:
            print(f"{kind} worker failed:\n{run['error']}")
            return
    base = runs.get("base", runs.get("both", {})).get("base", {})
    spec = runs.get("spec", runs.get("both", {})).get("spec", {})
    rows = []
    same = True
    for key, r in spec.items():
        b, p = key.split(":")
        ref = base[f"{b}:-"]
        if r["token_ids"] is not None:
            same = same and r["token_ids"] == ref["token_ids"]
        rows.append(
            [
                int(b),
                p,
                "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}",
                "-" if r["mean_acceptance_length"] is None else r["mean_acceptance_length"],
                ref["tok_s"],
                r["tok_s"],
                f"{r['tok_s'] / ref['tok_s']:.2f}x",
                ref["ms_per_step"],
                r["ms_per_step"],
                _ms(r.get("ms_per_step_p50")),
                _ms(r.get("ms_per_step_max")),
                _ms(ref.get("gpu_busy_ms")),
                _ms(r.get("gpu_busy_ms")),
                "-" if r.get("gpu_idle") is None else f"{100 * r['gpu_idle']:.1f}%",
            ]
        )
    name = args.shape if args.workload != "ngram" else os.path.basename(args.model.rstrip("/"))
    if args.workload == "draft_model":
        name = f"{args.shape}-draft-{args.draft_shape}"
    path = write_result(
        f"spec_decode-{args.workload}-{name}", {"config": vars(args), "env": env, "runs": runs}
    )
    print(f"\nresults: {path}\n")
    headers = ["batch", "p", "accepted", "tokens/verify", "base tok/s", "spec tok/s", "speedup"]
    timing = ["base ms/step", "spec ms/step", "spec p50 ms", "spec max ms"]
    gpu = ["base GPU ms/step", "spec GPU ms/step", "spec GPU idle"]
    print_table([*headers, *timing, *gpu], rows)
    for kind, per_point in [("base", base), ("spec", spec)]:
        for key, r in per_point.items():
            if "cprofile" in r:
                print(f"\n{kind} {key}: cProfile of one more decode run\n{r['cprofile']}")
    if args.workload == "ngram":
        print(f"\noutputs token-for-token identical to no speculation: {same}")
    else:
        follows = min(r["target_follows_f"] for r in spec.values())
        print(
            f"\nthe target followed f on at least {100 * follows:.1f}% of each request's tokens "
            "(the stand-in's acceptance is p only near 100%)"
        )


if __name__ == "__main__":
    main()
