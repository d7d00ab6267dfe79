"""`compiled-llm serve` stopped with SIGTERM: exit 0, no leaked-semaphore warning from
multiprocessing's resource tracker, and uvicorn's access log on by default (as in vLLM)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import API_KEY, Server, _cmdline, children_of, free_port, pid_alive

CLI = str(Path(sys.executable).parent / "compiled-llm")


def wait_healthy(server: Server, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.proc.poll() is None, server.log.read_text()[-3000:]
        try:
            if server.get("/health").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"not healthy in {timeout} s:\n{server.log.read_text()[-3000:]}")


@pytest.mark.slow
def test_sigterm_leaks_no_semaphore(tmp_path: Path, tiny_models) -> None:
    # -O1 with an empty compile cache: compiling is what created the semaphore (tqdm's lock).
    port = free_port()
    log = tmp_path / "server.log"
    cmd = [CLI, "serve", str(tiny_models("llama")), "-O1", "--max-model-len", "256"]
    cmd += ["--compile-cache-dir", str(tmp_path / "cache"), "--port", str(port)]
    cmd += ["--api-key", API_KEY]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        wait_healthy(server)
        trackers = [p for p in children_of(proc.pid) if b"resource_tracker" in _cmdline(p)]
        assert trackers, "the spawn context starts a resource tracker"
        assert server.stop() == 0
        deadline = time.monotonic() + 60
        while any(pid_alive(p) for p in trackers) and time.monotonic() < deadline:
            time.sleep(0.1)  # it reports leaks on its way out
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "leaked semaphore" not in text, text[-3000:]
    assert '"GET /health HTTP/1.1" 200' in text  # the access log
