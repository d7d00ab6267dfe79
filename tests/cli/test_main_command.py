"""README's main command, as a user runs it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest


def readme_command(marker: str) -> str:
    text = (Path(__file__).parents[2] / "README.md").read_text()
    block = text.split(f"<!-- {marker} -->", 1)[1]
    return re.search(r"^pip install.*$", block, re.M).group(0)


@pytest.mark.slow
def test_main_command_mentions_paris() -> None:
    command = readme_command("main-command")
    generate = command.split("&&")[-1].strip()
    assert generate.startswith("compiled-llm generate ")
    prompt = generate.removeprefix("compiled-llm generate ").strip('"')
    result = subprocess.run(
        [sys.executable, "-m", "compiled_llm.cli", "generate", prompt],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(prompt)
    assert "Paris" in result.stdout


def test_cli_reports_bad_model_cleanly(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "compiled_llm.cli", "generate", "hi", "--model", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "config.json" in result.stderr
    assert "Traceback" not in result.stderr
