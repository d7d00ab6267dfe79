"""Shared by the benchmark scripts: environment facts, device bandwidth, result files."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else platform.processor() or "cpu",
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    # The host: the engine's step loop is Python, so host-bound figures (speculation's draft
    # steps, structured output's grammar work) follow its speed, which differs several-fold
    # between the machines we are lent; a plain loop's time makes runs comparable.
    env["cpus"] = os.cpu_count()
    env["cpu_model"] = cpu_model()
    env["load"] = list(os.getloadavg())
    env["python_loop_ms"] = python_loop_ms()
    # The engine's own switches (COMPILED_LLM_PDL=0 ...): runs that differ only there.
    env["engine_env"] = {
        k: v for k, v in sorted(os.environ.items()) if k.startswith("COMPILED_LLM_")
    }
    # The installed distributions' versions (without importing them): a result depends on them,
    # e.g. xgrammar 0.2.8's bitmask fill was 40x slower than 0.2.9's.
    for key, dist in (
        ("flashinfer", "flashinfer-python"),
        ("transformers", "transformers"),
        ("xgrammar", "xgrammar"),
    ):
        try:
            env[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            env[key] = None
    return env


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def python_loop_ms(n: int = 1_000_000) -> float:
    """Milliseconds for n additions in a plain Python loop (best of 3): the host's speed at the
    kind of work the engine's step loop does."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        total = 0
        for i in range(n):
            total += i
        best = min(best, time.perf_counter() - start)
    return 1000 * best


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (CUDA), or host memcpy (CPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = nbytes if device == "cuda" else nbytes // 16
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(20):
            dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3 / 20
    else:
        import time

        t = time.perf_counter()
        for _ in range(5):
            dst.copy_(src)
        seconds = (time.perf_counter() - t) / 5
    return 2 * n / seconds


def write_result(name: str, payload: dict[str, Any], folder: str = "") -> str:
    """`results/<folder>/<name>-<date>-<time>.json` (folder: e.g. the machine, "cpu")."""
    directory = os.path.join(RESULTS, folder)
    os.makedirs(directory, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(directory, f"{name}-{stamp}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    return path


def run_worker(script: str, args: list[str], timeout: float = 1800) -> dict[str, Any]:
    """Run one configuration in a fresh process (so GPU memory and compile state start clean);
    the worker prints one JSON line last."""
    result = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:  # a negative status: killed by that signal (-9: the OOM killer?)
        return {"error": f"exit status {result.returncode}\n{result.stderr[-2000:]}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def kernel_spans(events: list[dict[str, Any]], category: str = "kernel") -> list[tuple]:
    """(start, end, name) of every event of `category` in a Chrome trace, in start order
    (kernels inside CUDA-graph replays included)."""
    return sorted(
        (e["ts"], e["ts"] + e["dur"], e["name"])
        for e in events
        if e.get("cat") == category and "dur" in e
    )


def profiled_kernel_spans(run: Callable[[], None]) -> list[tuple]:
    """Kernel spans of the CUDA work `run` launches (it ends by synchronizing), from a
    torch-profiler trace; kernels inside CUDA-graph replays included."""
    import tempfile

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            return kernel_spans(json.load(f)["traceEvents"])


def profile_engine_steps(
    engine: Any, steps: int, on_outputs: Callable[[list[Any]], None] | None = None
) -> tuple[float, float]:
    """Run up to `steps` engine steps (fewer once no request is left) under the torch profiler;
    the GPU's busy ms per step (kernels inside CUDA-graph replays included, overlaps counted
    once) and its idle share from the first kernel to the last. `on_outputs` sees each step's
    outputs."""
    done = 0

    def run() -> None:
        nonlocal done
        while done < steps and engine.has_unfinished_requests():
            outputs = engine.step()
            if on_outputs is not None:
                on_outputs(outputs)
            done += 1
        torch.cuda.synchronize()

    spans = profiled_kernel_spans(run)
    return busy_us(spans) / 1e3 / max(done, 1), idle_fraction(spans)


def cprofile_text(run: Callable[[], object], n: int) -> str:
    """Run `run` under cProfile; its `n` costliest functions by own time, as pstats prints
    them (where the host's time goes)."""
    import cProfile
    import io
    import pstats

    profile = cProfile.Profile()
    profile.enable()
    run()
    profile.disable()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(n)
    return out.getvalue()


def busy_us(spans: list[tuple]) -> float:
    """Microseconds in which at least one span runs (overlapping spans counted once)."""
    busy, end = 0.0, float("-inf")
    for s, e, *_ in spans:
        if e > end:
            busy += e - max(s, end)
            end = e
    return busy


def idle_fraction(spans: list[tuple]) -> float:
    """Share of the window from the first span's start to the last span's end covered by none."""
    if not spans:
        return float("nan")
    return 1.0 - busy_us(spans) / (max(e for _, e, *_ in spans) - spans[0][0])


def idle_split(spans: list[tuple], long_gap_us: float = 20.0) -> tuple[float, float]:
    """idle_fraction split by gap length: the shares of the window in gaps longer than
    `long_gap_us` (the device waiting for the host to launch more work, e.g. between steps)
    and in the shorter ones (between kernels queued together, such as a CUDA graph's)."""
    if not spans:
        return float("nan"), float("nan")
    window = max(e for _, e, *_ in spans) - spans[0][0]
    long = short = 0.0
    end = spans[0][1]
    for start, stop, *_ in spans[1:]:
        gap = start - end
        if gap > long_gap_us:
            long += gap
        elif gap > 0:
            short += gap
        end = max(end, stop)
    return long / window, short / window


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [headers] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, r in enumerate(cells):
        print(" | ".join(c.rjust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))
