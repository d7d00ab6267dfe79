"""Startup: cold and warm, each start in a fresh process.

Cold: empty compile cache and empty Inductor cache (for a GGUF also no converted config,
tokenizer or weights). Warm: the same caches again (what a second start of the same model sees).

Two modes:
  --shape NAME     random weights from a config dict (benchmarks/shapes.py): imports and `LLM()`
                   (weights, the KV sizing's memory profile, compile, CUDA-graph capture).
  --model MODEL    a real model ("embedded": the default one), started the way `compiled-llm
                   generate PROMPT --max-tokens 8` starts it: imports, `LLM()`, one short
                   generate. Also times the command itself on the warm cache.
In both, the stage table adds up to the process's wall time ("other": the rest of `LLM()`).

  python benchmarks/startup.py --shape llama-3.1-8b
  python benchmarks/startup.py --shape tiny -O 1                  # CPU smoke run
  python benchmarks/startup.py --model embedded --repeats 5       # CPU: the embedded model

Where a stage's time goes: `--stacks-every 0.5` has each start dump every thread's Python stack
every 0.5 s (faulthandler, so also while a C call holds the GIL) into
`startup-stacks-<start>-<time>.txt` beside the result; the k-th dump is k x 0.5 s after the
process began, and the stage table says which stage ran then.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from shapes import SHAPES, shape_folder  # noqa: E402

PROMPT = "The capital of France is"
# Stages of a start in the model mode, in order; they add up to the process's wall time.
STAGES = [
    "python",  # interpreter start, until this script runs
    "imports",  # what `compiled-llm generate` imports before it builds the engine
    "cuda_init",  # --shape on CUDA: the CUDA context and a first allocation, before `LLM()`
    # `import torch._dynamo`, which every start pays: torch imports it lazily at the first
    # parameter init on the meta device (the model's nn.Embedding) and the compiled pieces need
    # it; timed apart, or it lands in "config" (cold) or "weights" (warm)
    "dynamo_import",
    "config",
    "tokenizer",
    "weights",
    "kv_cache",
    "memory_profile",  # CUDA: the largest step run once, to size the KV cache
    "compile",  # at a warm start: loading the cached pieces + the first run
    "cudagraphs",  # CUDA graph capture
    "generate",  # the prompt, --max-tokens tokens (model mode)
    "exit",  # interpreter shutdown
    "other",  # the rest of LLM() (attention backend, scheduler, ...)
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    p.add_argument(
        "--model",
        default=None,
        help="a real model instead of a shape: 'embedded' or a local path (see above)",
    )
    p.add_argument("-O", dest="level", type=int, default=None, help="default: the platform's")
    p.add_argument("--max-model-len", type=int, default=4096, help="--shape mode")
    p.add_argument("--max-tokens", type=int, default=8, help="--model mode: tokens generated")
    p.add_argument(
        "--repeats", type=int, default=1, help="cold + warm pairs, each on fresh caches (medians)"
    )
    p.add_argument(
        "--stacks-every",
        type=float,
        default=0.0,
        help="seconds between stack dumps of each start (0: none; see above)",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stacks-file", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def shape_worker(args: argparse.Namespace) -> dict[str, Any]:
    begun = time.time()
    start = time.perf_counter()
    from compiled_llm import LLM

    imports = time.perf_counter() - start
    start = time.perf_counter()
    if _cuda():  # its own stage: otherwise it lands in whichever stage first touches the GPU
        import torch

        torch.empty(1, device="cuda")
        torch.cuda.synchronize()
    cuda_init = time.perf_counter() - start
    dynamo_import = _import_dynamo()
    start = time.perf_counter()
    llm = LLM(
        shape_folder(args.shape),
        load_format="dummy",
        skip_tokenizer_init=True,
        max_model_len=args.max_model_len,
        compilation_level=args.level,
        kv_cache_memory_bytes=None if _cuda() else 1 << 28,
    )
    return {
        "total_s": time.perf_counter() - start,
        "stages": {
            "imports": imports,
            "cuda_init": cuda_init,
            "dynamo_import": dynamo_import,
            **llm.start_seconds,
        },
        "started_at": begun,
        "finished_at": time.time(),
        **_start_stats(llm),
    }


def generate_argv(args: argparse.Namespace) -> list[str]:
    """`compiled-llm generate`'s arguments for this run."""
    argv = ["generate", PROMPT, "--max-tokens", str(args.max_tokens)]
    if args.model != "embedded":
        argv += ["--model", args.model]
    if args.level is not None:
        argv += ["-O", str(args.level)]
    return argv


def model_worker(args: argparse.Namespace) -> dict[str, Any]:
    """What `compiled-llm generate` does (cli/generate.py), timed by stage."""
    begun = time.time()
    start = time.perf_counter()
    import compiled_llm.cli as cli
    from compiled_llm.cli.args import engine_kwargs, sampling_params
    from compiled_llm.llm import LLM

    imports = time.perf_counter() - start
    dynamo_import = _import_dynamo()
    parsed = cli.build_parser().parse_args(generate_argv(args))
    start = time.perf_counter()
    llm = LLM(**engine_kwargs(parsed))
    total = time.perf_counter() - start
    start = time.perf_counter()
    out = llm.generate(PROMPT, sampling_params(parsed), use_tqdm=False)
    generate = time.perf_counter() - start
    return {
        "total_s": total,
        "stages": {
            "imports": imports,
            "dynamo_import": dynamo_import,
            **llm.start_seconds,
            "generate": generate,
        },
        "text": out[0].outputs[0].text,
        "started_at": begun,
        "finished_at": time.time(),
        **_start_stats(llm),
    }


def _import_dynamo() -> float:
    start = time.perf_counter()
    import torch._dynamo  # noqa: F401

    return time.perf_counter() - start


def _start_stats(llm: Any) -> dict[str, Any]:
    """The fields README's startup table reads."""
    runner = llm.engine.core.runner
    s = runner.compiled.stats if runner.compiled else None
    return {
        "weights_s": runner.load_seconds,
        "warm": s.warm if s else None,
        "trace_s": s.trace_s if s else 0.0,
        "passes_s": s.passes_s if s else 0.0,
        "inductor_s": s.inductor_s if s else 0.0,
        "cache_load_s": s.load_s if s else 0.0,
        "compile_s": (s.trace_s + s.passes_s + s.inductor_s + s.load_s) if s else 0.0,
        "cudagraph_s": runner.graphs.capture_seconds if runner.graphs else 0.0,
        "cudagraph_piecewise_s": runner.graphs.piecewise_capture_seconds if runner.graphs else 0.0,
    }


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_start(args: list[str], env: dict[str, str], stacks: str | None = None) -> dict[str, Any]:
    """One start in a fresh process; its stages add up to the process's wall time. With
    `stacks`, the process dumps its stacks there (--stacks-every)."""
    spawned = time.time()
    extra = ["--stacks-file", stacks] if stacks else []
    r = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *args, "--worker", *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    ended = time.time()
    if r.returncode:
        raise RuntimeError(f"start failed:\n{r.stderr[-3000:]}")
    run = json.loads(r.stdout.strip().splitlines()[-1])
    stages = {name: run["stages"].get(name, 0.0) for name in STAGES}
    stages["python"] = run.pop("started_at") - spawned
    stages["exit"] = ended - run.pop("finished_at")
    stages["other"] = ended - spawned - sum(stages.values())
    run["stages"] = stages
    run["wall_s"] = ended - spawned
    return run


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each number the median over the runs (nested dicts too); anything else from the first."""
    out: dict[str, Any] = {}
    for key, value in runs[0].items():
        if isinstance(value, dict):
            out[key] = median_run([r[key] for r in runs])
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = statistics.median(r[key] for r in runs)
        else:
            out[key] = value
    return out


def time_command(args: argparse.Namespace, env: dict[str, str], cwd: str) -> float:
    """Wall seconds of the `compiled-llm generate` command itself (run from the empty folder
    `cwd`: `python -m` puts it first on sys.path, where a source tree's folders, or the cache
    folder named compiled_llm, would shadow the installed package)."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "compiled_llm.cli", "-q", *generate_argv(args)],
        capture_output=True,
        check=True,
        env=env,
        cwd=cwd,
        timeout=1800,
    )
    return time.perf_counter() - start


def reference_import_seconds() -> float:
    """Median seconds of `python -c "import torch"`: how fast this machine is right now (its
    speed drifts between runs on a shared machine), for comparing results."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    args = parse_args()
    model_mode = args.model is not None
    if args.worker:
        if args.stacks_file and args.stacks_every > 0:
            stacks = open(args.stacks_file, "w")  # noqa: SIM115 (open until the process ends)
            faulthandler.dump_traceback_later(args.stacks_every, repeat=True, file=stacks)
        run = model_worker(args) if model_mode else shape_worker(args)
        print(json.dumps(run))
        # Ends as the `compiled-llm` command does (`serve` and `generate`): without the
        # interpreter's teardown of every object, which is not part of a start (an 8B shape's
        # engine took 4-7 s of it on the H200).
        from compiled_llm.cli import exit_now

        exit_now(0)
    from common import RESULTS, environment, print_table, write_result

    env = environment()
    env["load_before"] = os.getloadavg()
    env["import_torch_s"] = reference_import_seconds()
    print("config:", json.dumps(vars(args)), json.dumps(env), sep="\n  ")
    runs: dict[str, list[dict[str, Any]]] = {"cold": [], "warm": []}
    command_s: list[float] = []
    for _ in range(args.repeats):
        caches = tempfile.mkdtemp(prefix="compiled_llm_startup_")
        child_env = dict(
            os.environ,
            COMPILED_LLM_CACHE_DIR=os.path.join(caches, "compiled_llm"),
            TORCHINDUCTOR_CACHE_DIR=os.path.join(caches, "inductor"),
        )
        for name in ("cold", "warm"):
            stacks = None
            if args.stacks_every > 0:
                stamp = time.strftime("%Y%m%d-%H%M%S")
                folder = os.path.join(RESULTS, "" if _cuda() else "cpu")
                os.makedirs(folder, exist_ok=True)
                stacks = os.path.join(folder, f"startup-stacks-{name}-{stamp}.txt")
                print(f"{name} start: stacks every {args.stacks_every} s in {stacks}")
            try:
                run = run_start(sys.argv[1:], child_env, stacks)
            except RuntimeError as e:
                print(f"{name} start: {e}")
                return
            runs[name].append(run)
        if model_mode:
            empty = os.path.join(caches, "cwd")
            os.makedirs(empty)
            command_s.append(time_command(args, child_env, empty))
    env["load_after"] = os.getloadavg()
    env["import_torch_after_s"] = reference_import_seconds()
    result: dict[str, Any] = {
        "config": vars(args),
        "env": env,
        "runs": {name: median_run(r) for name, r in runs.items()},
        "all_runs": runs,
    }
    if model_mode:
        result["command_warm_s"] = statistics.median(command_s)
        result["command_warm_all_s"] = command_s
    name = f"startup-{args.shape if not model_mode else os.path.basename(args.model)}"
    path = write_result(name, result, folder="" if _cuda() else "cpu")
    print(f"\nresults: {path}\n")
    medians = result["runs"]
    print(
        f"machine: load {env['load_before'][0]:.2f} -> {env['load_after'][0]:.2f}, "
        f"`import torch` {env['import_torch_s']:.2f} -> {env['import_torch_after_s']:.2f} s"
    )
    print(f"medians of {args.repeats} (seconds; the stages add up to wall):")
    used = [s for s in STAGES if any(r["stages"][s] for r in medians.values())]
    print_table(
        ["start", *used, "wall_s", "cache_load_s", "trace_s"],
        [
            [n, *(r["stages"][s] for s in used), r["wall_s"], r["cache_load_s"], r["trace_s"]]
            for n, r in medians.items()
        ],
    )
    if model_mode:
        print(
            f"\n`compiled-llm -q {' '.join(generate_argv(args))}` on the warm cache: "
            f"median {result['command_warm_s']:.2f} s "
            f"({', '.join(f'{s:.2f}' for s in command_s)})"
        )
        print(f"text: {medians['warm']['text']!r}")
        return
    cols = [
        "total_s",
        "weights_s",
        "trace_s",
        "passes_s",
        "inductor_s",
        "cache_load_s",
        "compile_s",
        "cudagraph_s",
        "cudagraph_piecewise_s",
    ]
    print_table(["start", *cols], [[n, *(r[c] for c in cols)] for n, r in medians.items()])


if __name__ == "__main__":
    main()
