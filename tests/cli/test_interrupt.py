"""Ctrl-C during `compiled-llm generate` prints the text generated so far and exits 130, with no
traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import make_tiny_model

CLI = str(Path(sys.executable).parent / "compiled-llm")


@pytest.mark.slow
def test_ctrl_c_prints_partial_output(tmp_path: Path, embedded_tokenizer_dir: Path) -> None:
    # A long context, so that generation is still running when the signal comes.
    model = make_tiny_model(
        "llama", tmp_path / "long", embedded_tokenizer_dir, max_position_embeddings=65536
    )
    prompt = "Once upon a time"
    proc = subprocess.Popen(
        [CLI, "-v", "generate", prompt, "--model", str(model), "-O0"]
        + ["--max-tokens", "60000", "--ignore-eos"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, TOKENIZERS_PARALLELISM="false"),
        # Python raises KeyboardInterrupt on SIGINT only if it starts with SIGINT's default
        # action, and a child inherits an ignored signal: a test run started in the background
        # of a non-interactive shell (`pytest &`, nohup) ignores SIGINT.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    err = ""
    try:
        while "KV cache:" not in err:  # logged once the engine is built; generation follows
            line = proc.stderr.readline()
            assert line, f"exited before generating ({proc.wait()}):\n{err}"
            err += line
        time.sleep(2)  # let it generate some tokens (not an assertion on time)
        proc.send_signal(signal.SIGINT)
        out, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err += rest
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "interrupted" in err
    assert out.startswith(prompt)
    assert len(out.rstrip("\n")) > len(prompt)  # the partial completion was printed
