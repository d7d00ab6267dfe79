"""Structured-output overhead: output tokens/s of a batch of JSON-schema requests against the
same batch unconstrained, and grammar compile time of a large schema, in one run.

Random weights of a model shape (benchmarks/shapes.py), so outputs are noise: unconstrained
requests run to --output-len (ignore_eos), constrained ones to --output-len or until their
grammar ends; the figure compared is output tokens per second of the whole batch. A grammar
needs a tokenizer: --tokenizer DIR (an HF tokenizer folder; `--export-tokenizer DIR` writes the
embedded model's there, to carry to a machine without the model). Its vocabulary is padded to
the shape's, so the bitmask is as wide as the model's vocabulary; the host's fill cost follows
the tokenizer's own vocabulary size (printed).

  python benchmarks/structured_output.py --export-tokenizer bench_tokenizer
  python benchmarks/structured_output.py --shape llama-3.1-8b --tokenizer bench_tokenizer \\
      --batch 64 --input-len 128 --output-len 256
  python benchmarks/structured_output.py --shape tiny --tokenizer bench_tokenizer --batch 8 \\
      --output-len 32 --engine-args '{"enforce_eager": true}'            # CPU smoke run
  python benchmarks/structured_output.py --host-only --batch 64 --output-len 256  # no model
  python benchmarks/structured_output.py --shape tiny --tokenizer bench_tokenizer --batch 64 \\
      --output-len 128 --cprofile 12                 # CPU: where a step's time goes

--host-only times the grammar's host work alone, with no model: --batch matchers of the schema
advance --output-len steps on random allowed tokens; per step, the bitmask fill for all rows and
each matcher accepting its token, as the engine's matchers do them (matchers.Matchers.step).
With the matchers in the step loop (`structured_outputs_matchers="inline"`) both must fit inside
one forward with the rest of the step's host work for the grammar to cost no throughput; in
their own process (the default on CUDA), beside that host work.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    cprofile_text,
    environment,
    print_table,
    profile_engine_steps,
    write_result,
)
from shapes import SHAPES, shape_folder  # noqa: E402

# Never finishes on its own early: 40 objects of bounded fields, as a long tool-call argument or
# extraction result would be.
ITEM = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 100000},
        "name": {"type": "string", "maxLength": 24},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["id", "name", "tags", "score"],
}
SCHEMA = {"type": "array", "items": ITEM, "minItems": 40}


def large_schema(n: int) -> dict:
    """n object properties, each a small nested object: a large schema to compile."""
    return {
        "type": "object",
        "properties": {f"field_{i}": ITEM for i in range(n)},
        "required": [f"field_{i}" for i in range(n)],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    p.add_argument("--tokenizer", default=None, help="HF tokenizer folder (default: embedded)")
    p.add_argument("--export-tokenizer", default=None, metavar="DIR")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--large-schema-fields", type=int, default=200)
    p.add_argument("--engine-args", default="{}", help="JSON dict of extra LLM(...) arguments")
    p.add_argument(
        "--profile-steps",
        type=int,
        default=32,
        help="CUDA: decode steps of one more run per kind under the torch profiler, for the "
        "GPU ms/step and idle columns (0: skip)",
    )
    p.add_argument(
        "--cprofile",
        type=int,
        default=0,
        metavar="N",
        help="one more (untimed) run per kind under cProfile; print its N costliest functions "
        "by own time (where a CPU step's time goes)",
    )
    p.add_argument(
        "--fill-threads",
        default=None,
        help="xgrammar's bitmask fill threads, overriding the engine's choice ('auto' or a "
        "number; the engine takes 1 on CPU, auto on CUDA)",
    )
    p.add_argument("--host-only", action="store_true", help="time fill and accept, no model")
    p.add_argument(
        "--json-whitespace",
        default=None,
        help="--host-only: the JSON grammar's whitespace bound instead of the engine's "
        "(MAX_JSON_WHITESPACE): a number, or 'none' for unbounded; what the bound costs the fill",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from compiled_llm.models.loader import default_model_path, load_tokenizer

    if args.export_tokenizer:
        load_tokenizer(default_model_path()).save_pretrained(args.export_tokenizer)
        print(f"wrote the embedded model's tokenizer to {args.export_tokenizer}")
        return
    if args.host_only:
        from compiled_llm.structured_output import validate

        bound = validate.MAX_JSON_WHITESPACE
        if args.json_whitespace is not None:
            given = args.json_whitespace
            validate.MAX_JSON_WHITESPACE = None if given == "none" else int(given)
        try:
            host_only(args)
        finally:
            validate.MAX_JSON_WHITESPACE = bound
        return
    from compiled_llm import LLM, SamplingParams
    from compiled_llm.sampling_params import StructuredOutputsParams

    tokenizer = args.tokenizer or default_model_path()
    config = {k: v for k, v in vars(args).items() if k != "export_tokenizer"}
    env = environment()
    print(f"config: {json.dumps(config)}\nenv: {json.dumps(env)}")
    folder = shape_folder(args.shape)
    vocab = int(SHAPES[args.shape]["vocab_size"])
    tokenizer_vocab = len(load_tokenizer(tokenizer))
    if tokenizer_vocab > vocab:  # a small shape: widen its vocabulary to the tokenizer's
        with open(os.path.join(folder, "config.json")) as f:
            hf = json.load(f)
        folder = tempfile.mkdtemp(prefix="shape-")
        vocab = hf["vocab_size"] = tokenizer_vocab
        eos = load_tokenizer(tokenizer).eos_token_id
        hf["eos_token_id"] = hf["bos_token_id"] = eos
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(hf, f)
    llm = LLM(
        folder,
        tokenizer=tokenizer,
        load_format="dummy",
        max_model_len=max(2048, args.input_len + args.output_len),
        **json.loads(args.engine_args),
    )
    if args.fill_threads is not None:  # the engine's manager again, with these fill threads
        from compiled_llm.structured_output.manager import StructuredOutputManager

        core = llm.engine.core
        threads = args.fill_threads
        core.structured.shutdown()
        core.structured = StructuredOutputManager(
            tokenizer,
            vocab,
            max_rows=core.config.scheduler_config.max_num_seqs,
            pin_memory=core.config.device.type == "cuda",
            fill_threads=threads if threads == "auto" else int(threads),
            matchers=core.config.structured_outputs_config.matchers,
        )
    print(f"grammar matchers: {llm.engine.core.config.structured_outputs_config.matchers}")
    rng = random.Random(0)
    limit = min(vocab, tokenizer_vocab)

    def prompts(seed: int) -> list[dict]:
        rng.seed(seed)
        return [
            {"prompt_token_ids": [rng.randrange(limit) for _ in range(args.input_len)]}
            for _ in range(args.batch)
        ]

    plain = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    so = StructuredOutputsParams(json=SCHEMA)
    constrained = plain.clone(ignore_eos=False, structured_outputs=so)
    llm.generate(prompts(99), plain.clone(max_tokens=8), use_tqdm=False)  # warm up
    llm.generate(prompts(98)[:1], [constrained.clone(max_tokens=8)], use_tqdm=False)
    rows = []
    results = {}
    for name, params, seed in [("unconstrained", plain, 1), ("json_schema", constrained, 2)]:
        t = time.perf_counter()
        outs = llm.generate(prompts(seed), params, use_tqdm=False)
        seconds = time.perf_counter() - t
        tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
        reasons = sorted({str((c.finish_reason, c.stop_reason)) for o in outs for c in o.outputs})
        print(f"{name}: finish reasons {reasons}")
        results[name] = {"seconds": seconds, "output_tokens": tokens, "tok_s": tokens / seconds}
        results[name].update(gpu_profile(llm, prompts(seed + 10), params, args.profile_steps))
        if args.cprofile:
            print(f"\n{name}: cProfile of one more run, {args.cprofile} costliest by own time")
            batch = prompts(seed + 20)
            run = functools.partial(llm.generate, batch, params, use_tqdm=False)
            print(cprofile_text(run, args.cprofile))
        idle = results[name].get("gpu_idle")
        busy = results[name].get("gpu_busy_ms_per_step")
        rows.append(
            [
                name,
                args.batch,
                tokens,
                seconds,
                tokens / seconds,
                "-" if busy is None else f"{busy:.2f}",
                "-" if idle is None else f"{100 * idle:.1f}%",
            ]
        )
    overhead = 1 - results["json_schema"]["tok_s"] / results["unconstrained"]["tok_s"]

    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(llm.get_tokenizer(), vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    big = json.dumps(large_schema(args.large_schema_fields))
    t = time.perf_counter()
    compiler.compile_json_schema(big, any_whitespace=True, max_whitespace_cnt=20)
    compile_s = time.perf_counter() - t
    print(f"\ntokenizer vocabulary {tokenizer_vocab}, model vocabulary {vocab}")
    headers = ["requests", "batch", "output tokens", "seconds", "output tok/s"]
    print_table([*headers, "GPU ms/step", "GPU idle"], rows)
    print(f"json_schema overhead: {100 * overhead:.1f}% of output tok/s")
    print(
        f"compile of a {len(big)}-byte schema ({args.large_schema_fields} fields): {compile_s:.3f} s"
    )
    path = write_result(
        "structured_output",
        {
            "config": config,
            "env": env,
            "tokenizer_vocab": tokenizer_vocab,
            "results": results,
            "overhead": overhead,
            "large_schema_bytes": len(big),
            "compile_seconds": compile_s,
        },
    )
    print(f"\nresults: {path}")


def gpu_profile(llm, prompts, params, steps: int) -> dict:  # noqa: ANN001
    """CUDA: one more (untimed) run of the batch whose first `steps` decode steps, from the
    step after every request has its first token, run under the torch profiler: the GPU's busy
    ms per step and its idle share from first to last kernel. A constrained step that is slower
    but no busier on the GPU is waiting on the host."""
    import torch

    if not (steps and torch.cuda.is_available()):
        return {}
    engine = llm.engine
    short = params.clone(max_tokens=steps + 4)
    ids = [f"profile-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, short)
    started: set[str] = set()
    while len(started) < len(ids) and engine.has_unfinished_requests():
        started.update(o.request_id for o in engine.step() if o.outputs[0].token_ids)
    torch.cuda.synchronize()
    busy, idle = profile_engine_steps(engine, steps)
    while engine.has_unfinished_requests():
        engine.step()
    return {"gpu_busy_ms_per_step": busy, "gpu_idle": idle}


def host_only(args: argparse.Namespace) -> None:
    import queue

    import numpy as np
    import torch

    from compiled_llm.models.loader import default_model_path, load_tokenizer
    from compiled_llm.sampling_params import StructuredOutputsParams
    from compiled_llm.structured_output.manager import bitmask_width
    from compiled_llm.structured_output.matchers import Matchers
    from compiled_llm.structured_output.validate import grammar_spec

    env = environment()
    print(f"config: {json.dumps(vars(args))}\nenv: {json.dumps(env)}")
    tokenizer_path = args.tokenizer or default_model_path()
    tokenizer = load_tokenizer(tokenizer_path)
    vocab = max(int(SHAPES[args.shape]["vocab_size"]), len(tokenizer))
    threads = args.fill_threads or "auto"  # as the engine on CUDA, whose host this stands for
    # The matchers as the engine drives them (in its step loop, or in their own process), here
    # called directly: a step of accepts alone, then a step of fills alone.
    buffers = torch.empty((1, args.batch, bitmask_width(vocab)), dtype=torch.int32)
    notices: queue.Queue = queue.Queue()
    matchers = Matchers(
        tokenizer_path,
        vocab,
        trust_remote_code=False,
        fill_threads=threads if threads == "auto" else int(threads),
        buffers=buffers,
        notify=notices.put,
    )
    spec = grammar_spec(StructuredOutputsParams(json=SCHEMA))
    for key in range(args.batch):
        matchers.handle(("add", key, spec, [tokenizer.eos_token_id]))
    for _ in range(args.batch):
        notice = notices.get()
        assert notice[0] == "compiled" and notice[2] is None, notice
    keys: list[int | None] = list(range(args.batch))
    mask = buffers[0]
    rng = random.Random(0)
    fills, accepts = [], []
    for _ in range(args.output_len):
        t = time.perf_counter()
        matchers.step([], keys, mask)
        fills.append(time.perf_counter() - t)
        # The allowed tokens through numpy: torch ops here would leave OpenMP workers spinning
        # into the next step's fill and time them instead of the fill.
        bits = np.unpackbits(mask.numpy().view(np.uint8), axis=1, bitorder="little")
        tokens = []
        for row in bits[:, : len(tokenizer)]:
            ids = np.flatnonzero(row)
            tokens.append(int(ids[rng.randrange(len(ids))]))
        t = time.perf_counter()
        errors = matchers.step([(k, [tok]) for k, tok in enumerate(tokens)], [], mask[:0])
        accepts.append(time.perf_counter() - t)
        assert not errors, errors
    steps = args.output_len
    fill_ms, accept_ms = 1000 * sum(fills) / steps, 1000 * sum(accepts) / steps
    fill_med, accept_med = 1000 * statistics.median(fills), 1000 * statistics.median(accepts)
    print(f"{args.batch} rows, {steps} steps, {os.cpu_count()} CPUs")
    print(f"bitmask fill: {fill_ms:.2f} ms/step (median {fill_med:.2f}); ", end="")
    print(f"accept: {accept_ms:.2f} ms/step (median {accept_med:.2f}, ", end="")
    print(f"{1000 * accept_med / args.batch:.1f} us per token)")
    apply_ms = time_mask_application(mask, vocab)
    print(
        "mask on float32 logits (CPU), ms: "
        + ", ".join(f"{k} {v:.2f}" for k, v in apply_ms.items())
    )
    overlap = fill_beside_python(lambda: matchers.step([], keys, mask))
    print(
        "fill on a thread beside Python work, ms: "
        + ", ".join(f"{k} {v:.2f}" for k, v in overlap.items())
    )
    path = write_result(
        "structured_output-host",
        {
            "config": vars(args),
            "env": env,
            "fill_ms_per_step": fill_ms,
            "accept_ms_per_step": accept_ms,
            "fill_ms_median": fill_med,
            "accept_ms_median": accept_med,
            "mask_application_ms": apply_ms,
            "fill_overlap_ms": overlap,
        },
        folder="" if torch.cuda.is_available() else "cpu",
    )
    print(f"results: {path}")


def time_mask_application(mask, vocab: int, reps: int = 20) -> dict[str, float]:  # noqa: ANN001
    """Median ms to mask [rows, vocab] float32 CPU logits with `mask`, three ways: the sampler's
    (in place over every row), xgrammar's own kernel, and the sampler's former form (gather the
    rows, mask, index_put them back)."""
    import torch
    import xgrammar as xgr

    from compiled_llm.sampling.sampler import apply_token_bitmask

    logits = torch.randn(mask.shape[0], vocab)
    rows = torch.arange(mask.shape[0])
    bits = torch.arange(32, dtype=torch.int32)

    def former() -> None:
        allowed = ((mask[:, :, None] >> bits) & 1).bool().flatten(1)[:, :vocab]
        logits.index_put((rows,), logits[rows].masked_fill(~allowed, float("-inf")))

    ways = {
        "in place": lambda: apply_token_bitmask(logits, mask),
        "xgrammar cpu kernel": lambda: xgr.apply_token_bitmask_inplace(logits, mask),
        "gather/index_put": former,
    }
    out = {}
    for name, fn in ways.items():
        fn()
        out[name] = median_ms(fn, reps)
    return out


def fill_beside_python(fill: Callable[[], object], reps: int = 20) -> dict[str, float]:
    """Whether the bitmask fill releases the GIL: median ms of the fill alone, of a fixed
    pure-Python loop alone, and of both at once (the fill on a thread). Both at once near the
    longer of the two: released; near their sum: held (so the matchers run in a process of
    their own on CUDA)."""
    import threading

    def python_work() -> None:
        x = 0
        for i in range(200_000):
            x += i

    def both() -> None:
        thread = threading.Thread(target=fill)
        thread.start()
        python_work()
        thread.join()

    return {
        name: median_ms(fn, reps)
        for name, fn in (("fill", fill), ("python", python_work), ("both", both))
    }


def median_ms(fn: Callable[[], object], reps: int) -> float:
    """Median wall milliseconds of `reps` calls of `fn`."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


if __name__ == "__main__":
    main()
