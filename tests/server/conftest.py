"""A live `compiled-llm serve` subprocess on a free port (the embedded model, eager, small)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

API_KEY = "test-key"
SERVE_ARGS = ["-O0", "--max-model-len", "512", "--max-num-seqs", "128", "--seed", "0"]


@dataclass
class Server:
    proc: subprocess.Popen[str]
    url: str
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def get(self, path: str, **kw: object) -> httpx.Response:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        headers.update(kw.pop("headers", {}))  # type: ignore[arg-type]
        return httpx.get(self.url + path, headers=headers, timeout=60, **kw)  # type: ignore[arg-type]

    @property
    def core_pid(self) -> int:
        """The engine-core process (the server's one multiprocessing-spawned child)."""
        (pid,) = [p for p in children_of(self.pid) if b"spawn_main" in _cmdline(p)]
        return pid

    def post(self, path: str, **kw: object) -> httpx.Response:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        headers.update(kw.pop("headers", {}))  # type: ignore[arg-type]
        kw.setdefault("timeout", 300)
        return httpx.post(self.url + path, headers=headers, **kw)  # type: ignore[arg-type]

    def metric(self, name: str) -> float:
        for line in self.get("/metrics").text.splitlines():
            if line.startswith(f"compiled_llm:{name}{{") or line.startswith(
                f"compiled_llm:{name} "
            ):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """A fixture's teardown: kill the server if it still runs, and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(log: Path, *extra: str, model: str | None = None, timeout: float = 600) -> Server:
    """`compiled-llm serve` on a free port, once /health answers 200 (default: embedded model)."""
    port = free_port()
    cmd = [sys.executable, "-m", "compiled_llm.cli", "serve", *([model] if model else [])]
    cmd += [*SERVE_ARGS, *extra]
    cmd += ["--port", str(port), "--api-key", API_KEY, "--uvicorn-log-level", "warning"]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, env=env)
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if server.get("/health").status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"server not healthy in {timeout} s:\n{log.read_text()[-3000:]}")


def pid_alive(pid: int) -> bool:
    """True for a running process (a zombie awaiting its parent counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().split(")")[-1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid:
                out.append(int(entry.name))
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server per test module; tests that stop it come last in their module."""
    s = start_server(
        tmp_path_factory.mktemp("server") / "server.log", "--max-waiting-requests", "96"
    )
    yield s
    s.kill()
