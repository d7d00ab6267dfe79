"""Faults and shutdown around the server's engine-core process: a model that cannot load, a core
that dies, SIGTERM with a request in flight. Each test owns a server on a tiny random model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tests.server.conftest import API_KEY, Server, children_of, pid_alive, start_server


def stream_in_background(server: Server, max_tokens: int) -> tuple[list[str], threading.Thread]:
    """A streaming completion read on a thread; returns once its first line has arrived."""
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        body = {"prompt": "Count:", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
        headers = {"Authorization": f"Bearer {API_KEY}"}
        url = server.url + "/v1/completions"
        with httpx.stream("POST", url, json=body, headers=headers, timeout=120) as r:
            for line in r.iter_lines():
                lines.append(line)
                started.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert started.wait(120)
    return lines, reader


def wait_gone(pids: list[int], timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if pid_alive(p)]


def test_unloadable_model_fails_fast(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "compiled_llm.cli", "serve", str(tmp_path / "missing")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "neither a local HF folder" in done.stderr and "Traceback" not in done.stderr


def test_core_death_makes_health_503_and_server_exit(tmp_path: Path, tiny_models) -> None:
    server = start_server(tmp_path / "server.log", model=str(tiny_models("llama")))
    try:
        core = server.core_pid
        children = children_of(server.pid)
        assert core in children
        lines, reader = stream_in_background(server, max_tokens=400)
        os.kill(core, signal.SIGKILL)
        killed = time.monotonic()
        statuses = []
        while server.proc.poll() is None and time.monotonic() - killed < 30:
            try:
                statuses.append(server.get("/health").status_code)
            except httpx.HTTPError:
                statuses.append(0)  # no longer listening
            time.sleep(0.05)
        assert server.proc.wait(30) == 1
        assert time.monotonic() - killed < 10
        assert 503 in statuses and 200 not in statuses[statuses.index(503) :]
        reader.join(10)
        assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]"
        assert any('"ServiceUnavailableError"' in line for line in lines)
        assert not wait_gone(children)
    finally:
        server.kill()


def test_sigterm_finishes_in_flight_and_leaves_no_child(tmp_path: Path, tiny_models) -> None:
    model = str(tiny_models("llama"))
    server = start_server(tmp_path / "server.log", "--profile-dir", str(tmp_path), model=model)
    try:
        children = children_of(server.pid)
        assert server.core_pid in children
        # Profiling is forwarded to the core: done, or an error naming the missing hook.
        r = server.post("/start_profile")
        assert r.status_code == 200 or "profiler hook" in r.json()["error"]["message"], r.text
        if r.status_code == 200:
            stopped = server.post("/stop_profile")
            assert stopped.status_code == 200, stopped.text
            trace = stopped.json()["trace"]
            assert trace is None or Path(trace).is_file()
        lines, reader = stream_in_background(server, max_tokens=24)
        os.kill(server.pid, signal.SIGTERM)
        assert server.proc.wait(60) == 0
        reader.join(10)
        assert "data: [DONE]" in lines
        chunks = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # it was allowed to finish
        assert not wait_gone(children)
    finally:
        server.kill()
