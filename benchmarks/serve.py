"""Online serving benchmark: a load generator against an OpenAI-compatible server.

Requests go to /v1/completions as token-id prompts (exact input lengths), streamed, with
ignore_eos so each produces exactly its output length. Arrivals follow a Poisson process at
--request-rate (inf: all at once), optionally capped at --max-concurrency in flight. Reports
request throughput, output tokens/s, and TTFT / TPOT / ITL / end-to-end latency (mean, p50, p90,
p99); prints its configuration first, a fixed table last, and writes JSON to benchmarks/results/.

  python benchmarks/serve.py --base-url http://127.0.0.1:8000 --num-prompts 200 --request-rate 4
  python benchmarks/serve.py --launch "-O0 --max-model-len 512" --num-prompts 8 \\
      --input-len 16 --output-len 8 --max-concurrency 4   # starts (and stops) its own server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import environment, print_table, write_result  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base-url", default=None, help="a running server (default: http://HOST:PORT)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--launch",
        default=None,
        metavar="SERVE_ARGS",
        help="start `compiled-llm serve SERVE_ARGS` on a free port for the run",
    )
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument("--api-key", default=os.environ.get("COMPILED_LLM_API_KEY"))
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument(
        "--range-ratio",
        type=float,
        default=0.0,
        help="0: fixed lengths; r: uniform in [len*(1-r), len*(1+r)]",
    )
    p.add_argument("--token-id-range", default="1000,10000", help="LOW,HIGH of random prompt ids")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per request")
    p.add_argument("--label", default="serve", help="result file name prefix")
    p.add_argument("--result-dir", default=None, help="default: benchmarks/results")
    return p.parse_args(argv)


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    input_len: int = 0
    output_len: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)


def make_requests(args: argparse.Namespace) -> list[tuple[list[int], int]]:
    rng = random.Random(args.seed)
    low, high = (int(x) for x in args.token_id_range.split(","))

    def length(mean: int) -> int:
        r = args.range_ratio
        return max(1, rng.randint(int(mean * (1 - r)), int(mean * (1 + r))) if r else mean)

    out = []
    for _ in range(args.num_prompts):
        n_in, n_out = length(args.input_len), length(args.output_len)
        out.append(([rng.randrange(low, high) for _ in range(n_in)], n_out))
    return out


async def one_request(
    client: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int
) -> Result:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result = Result(input_len=len(prompt))
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if "error" in chunk:
                    result.error = chunk["error"]["message"]
                    return result
                if chunk.get("usage"):
                    result.output_len = chunk["usage"]["completion_tokens"]
                if chunk.get("choices"):
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
        result.e2e = time.perf_counter() - start
        result.ok = result.output_len > 0
    except (httpx.HTTPError, OSError) as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


async def run_load(args: argparse.Namespace, base_url: str) -> tuple[list[Result], float, str]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.max_concurrency or args.num_prompts)
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, timeout=args.timeout, limits=limits
    ) as client:
        model = args.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        requests = make_requests(args)
        gate = asyncio.Semaphore(args.max_concurrency or len(requests))
        arrivals = random.Random(args.seed + 1)

        async def limited(prompt: list[int], n_out: int) -> Result:
            async with gate:
                return await one_request(client, model, prompt, n_out)

        start = time.perf_counter()
        tasks = []
        for prompt, n_out in requests:
            tasks.append(asyncio.create_task(limited(prompt, n_out)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(arrivals.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start, model


def summarize(results: list[Result], duration: float) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    out_tokens = sum(r.output_len for r in done)
    in_tokens = sum(r.input_len for r in done)
    tpot = [(r.e2e - r.ttft) / (r.output_len - 1) for r in done if r.output_len > 1]
    series = {
        "ttft_ms": [r.ttft * 1e3 for r in done],
        "tpot_ms": [t * 1e3 for t in tpot],
        "itl_ms": [t * 1e3 for r in done for t in r.itl],
        "e2e_ms": [r.e2e * 1e3 for r in done],
    }
    stats = {}
    for name, values in series.items():
        a = np.asarray(values or [float("nan")])
        stats[name] = {
            "mean": float(a.mean()),
            "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)),
        }
    return {
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": duration,
        "request_throughput": len(done) / duration,
        "output_tokens_per_s": out_tokens / duration,
        "total_tokens_per_s": (in_tokens + out_tokens) / duration,
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "latency": stats,
    }


def launch_server(serve_args: str) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "compiled_llm.cli", "serve", *shlex.split(serve_args)]
    proc = subprocess.Popen([*cmd, "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not become healthy in 900 s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = {k: v for k, v in vars(args).items() if k != "api_key"}
    print(json.dumps({"config": config, "environment": environment()}, indent=2, default=str))
    server = None
    base_url = args.base_url or f"http://{args.host}:{args.port}"
    if args.launch is not None:
        server, base_url = launch_server(args.launch)
    try:
        results, duration, model = asyncio.run(run_load(args, base_url))
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    summary = summarize(results, duration)
    payload = {"config": config, "model": model, "environment": environment(), **summary}
    if args.result_dir:
        os.makedirs(args.result_dir, exist_ok=True)
        path = os.path.join(args.result_dir, f"{args.label}.json")
        with open(path, "w") as f:
            json.dump(payload, f, indent=2, default=str)
    else:
        path = write_result(args.label, payload)
    for error in summary["errors"]:
        print(f"error: {error}")
    print(f"\nresults: {path}")
    print(
        f"model {model} | {summary['completed']} done, {summary['failed']} failed in "
        f"{duration:.2f} s | {summary['request_throughput']:.2f} req/s | "
        f"{summary['output_tokens_per_s']:.1f} output tok/s | "
        f"{summary['total_tokens_per_s']:.1f} total tok/s"
    )
    rows = [
        [name.removesuffix("_ms").upper() + " (ms)", s["mean"], s["p50"], s["p90"], s["p99"]]
        for name, s in summary["latency"].items()
    ]
    print_table(["metric", "mean", "p50", "p90", "p99"], rows)
    return 0 if summary["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
