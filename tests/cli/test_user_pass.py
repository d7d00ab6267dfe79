"""A user pass named by dotted path loads from the current folder under the installed
`compiled-llm` console script (whose sys.path, unlike `python -m`'s, lacks that folder)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).parent / "compiled-llm")

PASS_MODULE = """
from pathlib import Path

from compiled_llm.passes.base import CompilerPass


class MarkerPass(CompilerPass):
    name = "marker"
    description = "rewrites nothing; leaves a file behind to show it ran"
    stage = "graph"
    enabled_by_default = False

    def apply(self, graph):
        Path("marker-pass-ran").write_text(str(len(graph.nodes)))
        return 0
"""


@pytest.mark.slow
def test_console_script_imports_user_pass_from_cwd(tmp_path: Path, tiny_models) -> None:
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "mypass.py").write_text(PASS_MODULE)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [CLI, "generate", "hi", "--model", str(tiny_models("llama")), "-O1", "--max-tokens", "1"]
        + ["--passes=+mypkg.mypass:MarkerPass", "--compile-cache-dir", str(tmp_path / "cache")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert int((tmp_path / "marker-pass-ran").read_text()) > 0  # it saw the captured graph
