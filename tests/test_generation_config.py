"""generation_config: the model's recommended sampling values (its generation_config.json) as
the defaults of what requests leave unset, read as vLLM reads them; `LLM` uses them without
sampling params. The server's use is in tests/server/test_generation_config.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from compiled_llm import LLM, SamplingParams
from compiled_llm.config import EngineArgs
from compiled_llm.generation_config import sampling_defaults

RECOMMENDED = {
    "temperature": 0.0,  # greedy: the outputs below are then deterministic
    "top_p": 0.9,
    "top_k": 50,  # transformers' default: recommends nothing (vLLM's to_diff_dict)
    "max_new_tokens": 3,
    "do_sample": True,  # not a sampling field vLLM reads
    "eos_token_id": 2,
}


def folder_with(tmp_path: Path, name: str, config: dict) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


def test_read_as_vllm_reads_it(tmp_path: Path) -> None:
    model = folder_with(tmp_path, "model", RECOMMENDED)
    other = folder_with(tmp_path, "other", {"temperature": 0.3, "repetition_penalty": 1.1})
    want = {"temperature": 0.0, "top_p": 0.9, "max_tokens": 3}
    assert sampling_defaults(str(model), "auto") == want
    assert sampling_defaults(str(model), "vllm") == {}
    assert sampling_defaults(str(model), str(other)) == {
        "temperature": 0.3,
        "repetition_penalty": 1.1,
    }
    over = {"temperature": 0.5, "max_new_tokens": 7}
    assert sampling_defaults(str(model), "auto", over) == {
        **want,
        "temperature": 0.5,
        "max_tokens": 7,
    }
    assert sampling_defaults(str(model), "vllm", over) == {"temperature": 0.5, "max_tokens": 7}
    assert sampling_defaults(str(tmp_path / "model.gguf"), "auto") == {}  # no folder, no file


def test_bad_settings_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="generation_config must be one of"):
        EngineArgs(generation_config=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="override_generation_config has unknown key.*do_sample"):
        EngineArgs(override_generation_config={"do_sample": True})
    with pytest.raises(ValueError, match="override_generation_config: temperature"):
        EngineArgs(override_generation_config={"temperature": -1.0})
    model = folder_with(tmp_path, "model", {"top_p": 7.0})
    with pytest.raises(ValueError, match="generation_config.json: top_p"):
        sampling_defaults(str(model), "auto")


def test_llm_uses_them_without_sampling_params(tmp_path: Path, tiny_models) -> None:
    """Oracle: the same prompt with the recommended values given explicitly (greedy, 3 tokens);
    "vllm" and an override change the defaults."""
    model = tmp_path / "model"
    shutil.copytree(tiny_models("llama"), model)
    (model / "generation_config.json").write_text(json.dumps(RECOMMENDED))
    llm = LLM(str(model), compilation_level=0, max_model_len=256)
    assert llm.get_default_sampling_params() == SamplingParams(
        temperature=0.0, top_p=0.9, max_tokens=3
    )
    prompt = {"prompt_token_ids": [5, 17, 40, 99, 7]}
    (got,) = llm.generate(prompt, use_tqdm=False)
    (want,) = llm.generate(
        prompt, SamplingParams(temperature=0.0, top_p=0.9, max_tokens=3), use_tqdm=False
    )
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    assert len(got.outputs[0].token_ids) == 3 or got.outputs[0].finish_reason == "stop"
    neutral = LLM(str(model), compilation_level=0, max_model_len=256, generation_config="vllm")
    assert neutral.get_default_sampling_params() == SamplingParams()
    over = LLM(
        str(model),
        compilation_level=0,
        max_model_len=256,
        override_generation_config={"max_new_tokens": 2},
    )
    assert over.get_default_sampling_params().max_tokens == 2
