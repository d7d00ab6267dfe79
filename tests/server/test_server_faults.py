"""Faults around the server's engine core: a model that cannot load, and a core that dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tests.server.conftest import API_KEY, children_of, pid_alive, start_server


def test_unloadable_model_fails_fast(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "compiled_llm.cli", "serve", str(tmp_path / "missing")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "neither a local HF folder" in done.stderr and "Traceback" not in done.stderr


def test_core_death_makes_health_503_and_server_exit(tmp_path: Path) -> None:
    server = start_server(tmp_path / "server.log")
    try:
        core = server.get("/version").json()["engine_core_pid"]
        children = children_of(server.pid)
        assert core in children
        lines: list[str] = []
        started = threading.Event()

        def stream() -> None:
            body = {"prompt": "Count to a hundred:", "max_tokens": 200, "stream": True}
            headers = {"Authorization": f"Bearer {API_KEY}"}
            with httpx.stream(
                "POST", server.url + "/v1/completions", json=body, headers=headers, timeout=120
            ) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(120)
        os.kill(core, signal.SIGKILL)
        killed = time.monotonic()
        statuses = []
        while server.proc.poll() is None and time.monotonic() - killed < 30:
            try:
                statuses.append(server.get("/health").status_code)
            except httpx.HTTPError:
                statuses.append(0)
            time.sleep(0.05)
        assert server.proc.wait(30) != 0
        assert time.monotonic() - killed < 10
        assert 503 in statuses and 200 not in statuses[statuses.index(503) :]
        reader.join(10)
        assert "data: [DONE]" in lines
        assert any('"ServiceUnavailableError"' in line for line in lines)
        deadline = time.monotonic() + 10
        while any(pid_alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in children if pid_alive(p)]
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(30)
