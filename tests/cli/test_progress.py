"""A start tells the user what it is doing, one line per stage, at the default level: loading
weights, compiling (first start only, with a bar over the pieces), ready; `-q` silences it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def generate(model: Path, cache: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "compiled_llm.cli", *flags, "generate", "Hello"]
    cmd += ["--model", str(model), "--max-tokens", "2", "-O1", "--max-model-len", "64"]
    env = dict(os.environ, COMPILED_LLM_CACHE_DIR=str(cache))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Hello")
    return done


@pytest.mark.slow
def test_start_stages_are_reported_and_q_silences_them(tmp_path: Path, tiny_models) -> None:
    model = tiny_models("llama")
    cold = generate(model, tmp_path).stderr
    for line in ("loading weights of", "loaded weights in", "compiling the model", "ready in"):
        assert line in cold, (line, cold)
    assert "compiling pieces" in cold  # the bar
    warm = generate(model, tmp_path).stderr
    assert "ready in" in warm and "compiling the model" not in warm  # the cache serves it
    assert "warm compile in" in warm
    assert generate(model, tmp_path, "-q").stderr == ""
    assert "pass attention_lowering" in generate(model, tmp_path / "v", "-v").stderr  # details
