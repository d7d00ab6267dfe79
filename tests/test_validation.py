"""Bad input raises a ValueError naming the problem, and running requests are unaffected."""

from __future__ import annotations

import json
import shutil

import pytest

from compiled_llm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_models) -> LLM:
    return LLM(str(tiny_models("llama")), max_model_len=64, enforce_eager=True)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.5}, "temperature"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -3}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"n": 0}, "n"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["."], "detokenize": False}, "stop"),
        ({"detokenize": 0}, "detokenize"),
    ],
)
def test_bad_sampling_params(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_leave_running_requests_alone(llm: LLM) -> None:
    engine = llm.engine
    free = engine.num_free_blocks
    expected = llm.generate("Keep going", GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    engine.add_request("running", "Keep going", GREEDY)
    engine.step()
    bad = [
        ("", GREEDY, "empty"),
        ({"prompt_token_ids": []}, GREEDY, "empty"),
        ({"prompt_token_ids": [10**9]}, GREEDY, "vocabulary"),
        ("word " * 80, GREEDY, "max_model_len"),
        ("short", SamplingParams(max_tokens=64), "max_tokens"),
    ]
    for i, (prompt, params, message) in enumerate(bad):
        with pytest.raises(ValueError, match=message):
            engine.add_request(f"bad{i}", prompt, params)
    done = []
    while engine.has_unfinished_requests():
        done += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in done] == ["running"]
    assert done[0].outputs[0].token_ids == expected
    assert engine.num_free_blocks == free


def test_generate_validates_whole_batch_first(llm: LLM) -> None:
    free = llm.engine.num_free_blocks
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate(["fine", "word " * 80], GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.num_free_blocks == free


def test_unknown_model_path(tmp_path) -> None:
    with pytest.raises(ValueError, match="neither a local HF folder nor a .gguf file"):
        LLM(str(tmp_path / "no-such-model"))
    with pytest.raises(ValueError, match="neither a local HF folder nor a .gguf file"):
        LLM("meta-llama/Llama-3.1-8B")  # a hub name: never downloaded


def test_unsupported_architecture(tiny_models, tmp_path) -> None:
    path = tmp_path / "odd"
    shutil.copytree(tiny_models("llama"), path)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))
    # auto tries the transformers fallback, which refuses a name transformers does not map
    with pytest.raises(ValueError, match="FancyNewForCausalLM cannot run in the transformers"):
        LLM(str(path), enforce_eager=True)
    with pytest.raises(ValueError, match="no native class.*FancyNew.*LlamaForCausalLM"):
        LLM(str(path), enforce_eager=True, model_impl="native")


def test_unknown_engine_argument() -> None:
    with pytest.raises(TypeError, match="max_num_seq"):
        LLM(max_num_seq=4)


def test_bad_engine_values(tiny_models) -> None:
    path = str(tiny_models("llama"))
    with pytest.raises(ValueError, match="dtype"):
        LLM(path, dtype="float8")
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(path, max_model_len=10**6)
    with pytest.raises(ValueError, match="attention_backend"):
        LLM(path, attention_backend="magic")
