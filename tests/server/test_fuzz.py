"""Requests generated from the server's own OpenAPI schema by schemathesis, valid and invalid
(wrong types, missing and extra fields, boundary values): none may get a 5xx, and afterwards the
server answers, its engine core is the same process and every KV block is free again. The
hand-written hostile requests are in test_hardening.py."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.conftest import API_KEY, Server, start_server

pytest.importorskip("schemathesis")

EXAMPLES = 20  # per operation; deterministic generation: a failure here fails every run


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_models) -> Iterator[Server]:
    s = start_server(
        tmp_path_factory.mktemp("fuzz") / "server.log",
        "--enable-docs",
        "--max-waiting-requests",
        "32",
        model=str(tiny_models("llama")),
    )
    yield s
    s.kill()


@pytest.mark.slow
def test_generated_requests_get_no_server_error(server: Server, tmp_path: Path) -> None:
    core = server.core_pid
    free_before = server.metric("kv_cache_free_blocks")
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json"]
    cmd += ["--header", f"Authorization: Bearer {API_KEY}", "--checks", "not_a_server_error"]
    cmd += ["--phases", "examples,fuzzing", "--max-examples", str(EXAMPLES)]
    cmd += ["--generation-deterministic", "--workers", "1", "--request-timeout", "120"]
    # profiling writes traces and is tested on its own (tests/test_profiling.py)
    cmd += ["--exclude-path", "/start_profile", "--exclude-path", "/stop_profile"]
    # cwd: schemathesis keeps a .schemathesis/ directory where it runs
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "generated" in run.stdout, run.stdout[-3000:]

    assert server.get("/health").status_code == 200
    assert server.core_pid == core
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and server.metric("num_requests_running") > 0:
        time.sleep(0.2)
    assert server.metric("num_requests_running") == 0
    assert server.metric("num_requests_waiting") == 0
    assert server.metric("kv_cache_free_blocks") == free_before
    ok = server.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
