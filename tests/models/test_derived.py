"""The config and tokenizer derived once from transformers answer as transformers' own do (the
oracle), are derived anew when their source changes, and a later load imports no transformers."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from compiled_llm import envs
from compiled_llm.models.derived import EngineTokenizer
from compiled_llm.models.loader import (
    default_model_path,
    load_engine_tokenizer,
    load_hf_config,
    load_tokenizer,
    transformers_config,
)
from compiled_llm.models.registry import _CAUSAL_LM_OF_TYPE, architecture_of

TEXTS = [
    "The capital of France is",
    "",
    " x",
    "def f(x):\n    return x ** 2  # ünïcödé, 日本語, 🙂",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>",
    "<s>a</s> <unk> <|endoftext|>",
]


def embedded() -> str:
    try:
        return default_model_path()
    except ValueError:
        pytest.skip("the embedded model is not installed")


@pytest.fixture
def sources(tiny_models) -> list[str]:
    found = [str(tiny_models("llama")), str(tiny_models("qwen3"))]
    with contextlib.suppress(ValueError):
        found.append(default_model_path())
    return found


@pytest.mark.slow
def test_config_answers_as_transformers(tmp_path: Path, sources: list[str]) -> None:
    with envs.override(cache_dir=str(tmp_path)):
        for source in sources:
            real = transformers_config(source)
            for _ in range(2):  # derived, then read back
                config = load_hf_config(source)
                assert config.to_json_string() == real.to_json_string(use_diff=False), source
                for name, value in json.loads(real.to_json_string(use_diff=False)).items():
                    assert getattr(config, name) == value, (source, name)
                assert getattr(config, "no_such_field", "absent") == "absent"
                assert config.get_text_config().to_dict() == real.get_text_config().to_dict()
                assert architecture_of(config) == architecture_of(real)
                copied = pickle.loads(pickle.dumps(config))
                assert copied.to_json_string() == config.to_json_string()
                assert copied.get_text_config().to_dict() == real.to_dict()


@pytest.mark.slow
def test_tokenizer_answers_as_transformers(tmp_path: Path, sources: list[str]) -> None:
    with envs.override(cache_dir=str(tmp_path)):
        for source in sources:
            real = load_tokenizer(source)
            for _ in range(2):
                light = load_engine_tokenizer(source)
                assert isinstance(light, EngineTokenizer), source
                assert light.eos_token_id == real.eos_token_id
                for text in TEXTS:
                    ids = real.encode(text)
                    assert light.encode(text) == ids, (source, text)
                    assert light.encode(text, add_special_tokens=False) == real.encode(
                        text, add_special_tokens=False
                    )
                    for skip in (False, True):
                        assert light.decode(ids, skip) == real.decode(ids, skip_special_tokens=skip)


def test_changed_source_is_derived_again(tmp_path: Path, tiny_models) -> None:
    model = tmp_path / "model"
    model.mkdir()
    for file in Path(tiny_models("llama")).iterdir():
        (model / file.name).symlink_to(file)
    (model / "config.json").unlink()
    config = json.loads((Path(tiny_models("llama")) / "config.json").read_text())
    with envs.override(cache_dir=str(tmp_path / "cache")):
        (model / "config.json").write_text(json.dumps(config))
        assert load_hf_config(str(model)).rms_norm_eps == config["rms_norm_eps"]
        config["rms_norm_eps"] = 0.125
        (model / "config.json").write_text(json.dumps(config))
        os.utime(model / "config.json", ns=(1, 1))  # even with an old mtime: the size changed
        assert load_hf_config(str(model)).rms_norm_eps == 0.125


def test_underivable_tokenizer_falls_back(tmp_path: Path, tiny_models) -> None:
    """A tokenizer that cleans up decoded spaces is transformers' own, not derived."""
    model = tmp_path / "model"
    model.mkdir()
    for file in Path(tiny_models("llama")).iterdir():
        (model / file.name).symlink_to(file)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").unlink()
    config["clean_up_tokenization_spaces"] = True
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    with envs.override(cache_dir=str(tmp_path / "cache")):
        tok = load_engine_tokenizer(str(model))
    assert not isinstance(tok, EngineTokenizer)
    assert tok.clean_up_tokenization_spaces


def test_local_architecture_table_is_transformers() -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for model_type, arch in _CAUSAL_LM_OF_TYPE.items():
        assert MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type] == arch


@pytest.mark.slow
def test_derived_load_imports_no_transformers(tmp_path: Path) -> None:
    embedded()
    env = dict(os.environ, COMPILED_LLM_CACHE_DIR=str(tmp_path))
    code = (
        "import sys; from compiled_llm.models import loader as l; p = l.default_model_path(); "
        "c = l.load_hf_config(p); t = l.load_engine_tokenizer(p); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))"
    )
    runs = [
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        for _ in range(2)
    ]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
    assert runs[0].stdout.strip() != "[]"  # the first load derives, with transformers
    assert runs[1].stdout.strip() == "[]", runs[1].stdout


def test_publish_keeps_an_entry_another_process_published(tmp_path) -> None:
    """Two writers of one cache entry (tensor-parallel ranks starting together): the second
    finds the first's folder in place, keeps it, and drops its own copy without an error."""
    from compiled_llm.models.derived import publish

    folder = tmp_path / "entry"
    for writer in ("first", "second"):
        tmp = tmp_path / f"entry.tmp-{writer}"
        tmp.mkdir()
        (tmp / "who").write_text(writer)
        publish(str(tmp), str(folder))
        assert not tmp.exists()
    assert (folder / "who").read_text() == "first"
