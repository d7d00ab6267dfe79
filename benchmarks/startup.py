"""Startup: weight load, cold and warm compile, CUDA-graph capture, each in a fresh process.

Cold: empty compile cache and empty Inductor cache. Warm: the same caches again (what a second
start of the same model sees). Random weights from a config dict (benchmarks/shapes.py).

  python benchmarks/startup.py --shape llama-3.1-8b
  python benchmarks/startup.py --shape tiny -O 1      # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import environment, print_table, write_result  # noqa: E402
from shapes import SHAPES, shape_folder  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    p.add_argument("-O", dest="level", type=int, default=None, help="default: the platform's")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args()


def worker(args: argparse.Namespace) -> dict:
    from compiled_llm import LLM

    start = time.perf_counter()
    llm = LLM(
        shape_folder(args.shape),
        load_format="dummy",
        skip_tokenizer_init=True,
        max_model_len=args.max_model_len,
        compilation_level=args.level,
        kv_cache_memory_bytes=None if _cuda() else 1 << 28,
    )
    total = time.perf_counter() - start
    runner = llm.engine.core.runner
    s = runner.compiled.stats if runner.compiled else None
    return {
        "total_s": total,
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


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    import subprocess

    env = environment()
    print("config:", json.dumps(vars(args)), json.dumps(env), sep="\n  ")
    caches = tempfile.mkdtemp(prefix="compiled_llm_startup_")
    child_env = dict(
        os.environ,
        COMPILED_LLM_CACHE_DIR=os.path.join(caches, "compiled_llm"),
        TORCHINDUCTOR_CACHE_DIR=os.path.join(caches, "inductor"),
    )
    runs = {}
    for name in ("cold", "warm"):
        cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--worker"]
        r = subprocess.run(cmd, capture_output=True, text=True, env=child_env, timeout=1800)
        if r.returncode:
            print(f"{name} start failed:\n{r.stderr[-3000:]}")
            return
        runs[name] = json.loads(r.stdout.strip().splitlines()[-1])
    path = write_result(f"startup-{args.shape}", {"config": vars(args), "env": env, "runs": runs})
    print(f"\nresults: {path}\n")
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
    print_table(["start", *cols], [[n, *(r[c] for c in cols)] for n, r in runs.items()])


if __name__ == "__main__":
    main()
