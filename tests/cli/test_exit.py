"""The command's fast exit (`exit_now`) still does what an ordinary exit does: buffered output
written, log handlers flushed, atexit callbacks and weakref finalizers run, the status kept, and a
running non-daemon thread waited for."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import atexit, logging, sys, tempfile, threading, time, weakref
    from compiled_llm.cli import exit_now

    logging.basicConfig(stream=sys.stderr, format="%(message)s")
    logging.getLogger("t").warning("logged")
    atexit.register(lambda: print("atexit ran"))
    folder = tempfile.TemporaryDirectory()
    print(folder.name)
    sys.stdout.write("buffered, no newline")
    if sys.argv[1] == "thread":
        threading.Thread(target=lambda: (time.sleep(0.5), print("thread done"))).start()
    exit_now(int(sys.argv[2]))
    """
)


def run(mode: str, code: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, mode, str(code)], capture_output=True, text=True, timeout=60
    )


def test_exit_now_flushes_and_runs_exit_callbacks() -> None:
    result = run("plain", 3)
    assert result.returncode == 3, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1:] == ["buffered, no newlineatexit ran"]
    assert not os.path.exists(lines[0])  # the TemporaryDirectory's finalizer ran
    assert result.stderr.strip() == "logged"


def test_exit_now_waits_for_a_running_thread() -> None:
    result = run("thread", 0)
    assert result.returncode == 0, result.stderr
    assert "thread done" in result.stdout and "atexit ran" in result.stdout
