"""Command-line errors: the subcommand's usage, exit status 2, no traceback, and nothing loaded
before the arguments are checked."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from compiled_llm import cli
from compiled_llm.models import loader


class WeightsRead(Exception):
    pass


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every weight read fails the command with WeightsRead (and is recorded)."""
    reads: list[str] = []

    def read(folder: str, shard: object = None):
        reads.append(folder)
        raise WeightsRead(folder)

    monkeypatch.setattr(loader, "iterate_safetensors", read)
    return reads


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        (["generate", "hi", "--bogus"], "compiled-llm generate"),
        (["passes", "report", "--bogus"], "compiled-llm passes report"),
        (["serve", "--bogus"], "compiled-llm serve"),
        (["generate", "hi", "-O", "5"], "compiled-llm generate"),
        (["serve", "--port", "99999"], "compiled-llm serve"),
        (["serve", "--max-waiting-requests", "0"], "compiled-llm serve"),
    ],
)
def test_errors_show_the_subcommands_usage(capsys, argv: list[str], usage: str) -> None:
    code, err = run(capsys, *argv)
    assert code == 2
    assert f"usage: {usage} " in err
    assert "usage: compiled-llm [-h]" not in err
    assert f"{usage}: error: " in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--max-tokens", "0"], "max_tokens"),
        (["--top-p", "0"], "top_p"),
        (["--passes=+nonexistent"], "unknown compiler pass 'nonexistent'"),
        (["--passes=+no_such_pkg.module:Pass"], "cannot load compiler pass"),
        (["--block-size", "3"], "block_size"),
        (["--gpu-memory-utilization", "2"], "gpu_memory_utilization"),
    ],
)
def test_generate_checks_arguments_before_loading(
    capsys, tiny_models, no_weights, argv: list[str], message: str
) -> None:
    model = str(tiny_models("llama"))
    code, err = run(capsys, "generate", "hi", "--model", model, "-O0", *argv)
    assert code == 2
    assert "usage: compiled-llm generate " in err
    assert message in err
    assert no_weights == []


def test_generate_reads_weights_when_arguments_are_fine(capsys, tiny_models, no_weights) -> None:
    """The fixture above does catch a weight read (so the tests using it can fail)."""
    model = str(tiny_models("llama"))
    with pytest.raises(WeightsRead):
        cli.main(["generate", "hi", "--model", model, "-O0", "--max-tokens", "1"])
    assert no_weights == [model]


def test_serve_checks_arguments_before_binding_or_loading(capsys, tiny_models, no_weights):
    model = str(tiny_models("llama"))
    code, err = run(capsys, "serve", model, "-O0", "--passes=+nonexistent")
    assert code == 2
    assert "usage: compiled-llm serve " in err
    assert "unknown compiler pass" in err
    assert no_weights == []


def test_serve_settings_from_flags(monkeypatch: pytest.MonkeyPatch, tiny_models) -> None:
    """Access log on by default (vLLM: uvicorn's access log unless
    --disable-uvicorn-access-log); the API key falls back to $COMPILED_LLM_API_KEY."""
    from compiled_llm.server import api_server

    seen = []

    async def serve(settings) -> int:
        seen.append(settings)
        return 0

    monkeypatch.setattr(api_server, "serve", serve)
    monkeypatch.setenv("COMPILED_LLM_API_KEY", "from-env")
    model = str(tiny_models("llama"))
    level = logging.getLogger("compiled_llm").level  # serve sets INFO
    try:
        assert cli.main(["serve", model, "-O0"]) == 0
        assert cli.main(["serve", model, "-O0", "--disable-uvicorn-access-log"]) == 0
        assert cli.main(["serve", model, "-O0", "--no-access-log", "--api-key", "flag"]) == 0
    finally:
        logging.getLogger("compiled_llm").setLevel(level)
    assert [s.access_log for s in seen] == [True, False, False]
    assert [s.api_key for s in seen] == ["from-env", "from-env", "flag"]
    assert seen[0].engine_kwargs["model"] == model
    assert seen[0].engine_kwargs["async_scheduling"] is True


def test_model_folder_without_weights(capsys, tmp_path: Path, tiny_models) -> None:
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(tiny_models("llama") / "config.json", folder)
    code, err = run(capsys, "generate", "hi", "--model", str(folder), "-O0")
    assert code == 2
    assert "has no *.safetensors files" in err
    assert "Traceback" not in err


def test_model_folder_without_tokenizer(capsys, tmp_path: Path, tiny_models, no_weights) -> None:
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_models("llama") / name, folder)
    with pytest.raises(ValueError, match=r"no tokenizer files \(looked for tokenizer\.json"):
        loader.load_tokenizer(str(folder))
    code, err = run(capsys, "generate", "hi", "--model", str(folder), "-O0")
    assert code == 2
    assert "has no tokenizer files" in err and "--skip-tokenizer-init" in err
    assert "sentencepiece" not in err
    assert no_weights == []  # the tokenizer is checked before the weights load


def test_tokenizer_folder_without_config(
    capsys, tmp_path: Path, tiny_models, embedded_tokenizer_dir: Path
) -> None:
    """--tokenizer takes a tokenizer-only folder (save_pretrained of a tokenizer, no
    config.json), as vLLM does; a folder without tokenizer files is refused by name."""
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_models("llama") / name, folder)
    assert not (embedded_tokenizer_dir / "config.json").exists()
    argv = ["generate", "hi", "--model", str(folder), "-O0", "--max-tokens", "2"]
    code, err = run(capsys, *argv, "--tokenizer", str(embedded_tokenizer_dir))
    assert code == 0, err
    code, err = run(capsys, *argv, "--tokenizer", str(tmp_path))
    assert code == 2
    assert "has no tokenizer files" in err and "Traceback" not in err
