"""Torch-profiler traces from `LLM` open as JSON and name the engine's stages."""

from __future__ import annotations

import json

import pytest

from compiled_llm import LLM, SamplingParams
from compiled_llm.profiler import STAGES


def test_llm_profile_window(tiny_models, tmp_path) -> None:
    llm = LLM(
        str(tiny_models("llama")), max_model_len=128, enforce_eager=True, profile_dir=str(tmp_path)
    )
    llm.start_profile()
    llm.generate(["profile me", "and me"], SamplingParams(max_tokens=4), use_tqdm=False)
    path = llm.stop_profile()
    with open(path) as f:
        trace = json.load(f)
    names = {e.get("name") for e in trace["traceEvents"]}
    assert set(STAGES) <= names
    with pytest.raises(ValueError, match="no profile"):
        llm.stop_profile()


def test_profile_needs_a_directory(tiny_models) -> None:
    llm = LLM(str(tiny_models("llama")), max_model_len=128, enforce_eager=True)
    with pytest.raises(ValueError, match="profile_dir"):
        llm.start_profile()
