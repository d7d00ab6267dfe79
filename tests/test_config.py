"""EngineArgs is the one source of the engine's options: defaults, validation, CLI flags, help;
environment variables are read through compiled_llm/envs.py only."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from compiled_llm import envs
from compiled_llm.cli import build_parser
from compiled_llm.cli.args import engine_kwargs
from compiled_llm.config import (
    CacheConfig,
    CompilationConfig,
    EngineArgs,
    EngineConfig,
    ModelConfig,
    ObservabilityConfig,
    ParallelConfig,
    SchedulerConfig,
)

ROOT = Path(__file__).parent.parent
COMMANDS = (["generate", "hi"], ["serve"], ["passes", "report"])


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_cli_defaults_are_engine_args_defaults(command: list[str]) -> None:
    assert engine_kwargs(parse(*command)) == dataclasses.asdict(EngineArgs())


def test_frozen_configs_carry_no_defaults_of_their_own() -> None:
    """Their values come from EngineArgs; a default here could disagree with it (as
    async_scheduling once did: False here, True there)."""
    configs = (
        ModelConfig,
        CacheConfig,
        SchedulerConfig,
        CompilationConfig,
        ObservabilityConfig,
        ParallelConfig,
        EngineConfig,
    )
    with_default = [
        f"{cls.__name__}.{f.name}"
        for cls in configs
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    ]
    assert with_default == []


def test_every_engine_field_has_a_flag_with_help() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["generate"]
    by_dest = {a.dest: a for a in sub._actions}
    for f in dataclasses.fields(EngineArgs):
        action = by_dest[f.name]
        assert action.help, f.name
        if f.default in (None, ()):
            assert "default" in action.help, f"{f.name}: say what no value means"
        else:
            assert "%(default)s" in action.help, f.name
    assert by_dest["compilation_level"].option_strings == ["-O", "--compilation-level"]


def test_flags_use_vllm_names_and_types() -> None:
    args = parse(
        "generate",
        "hi",
        "--max-num-seqs",
        "8",
        "--gpu-memory-utilization",
        "0.5",
        "--no-enable-prefix-caching",
        "--no-async-scheduling",
        "-O0",
        "--enforce-eager",
        "--passes=+fuse_add_rmsnorm, -gemm_merge",
        "--cudagraph-capture-sizes",
        "1,2,8",
        "--model",
        "m",
    )
    kwargs = engine_kwargs(args)
    assert kwargs["max_num_seqs"] == 8
    assert kwargs["gpu_memory_utilization"] == 0.5
    assert kwargs["enable_prefix_caching"] is False
    assert kwargs["async_scheduling"] is False
    assert kwargs["compilation_level"] == 0
    assert kwargs["enforce_eager"] is True
    assert kwargs["passes"] == ("+fuse_add_rmsnorm", "-gemm_merge")
    assert kwargs["cudagraph_capture_sizes"] == (1, 2, 8)
    assert kwargs["model"] == "m"


def test_serve_takes_the_model_as_positional_or_flag() -> None:
    assert engine_kwargs(parse("serve", "a"))["model"] == "a"
    assert engine_kwargs(parse("serve", "--model", "b"))["model"] == "b"
    assert engine_kwargs(parse("passes", "report", "c", "--model", "c"))["model"] == "c"
    with pytest.raises(ValueError, match="give the model once"):
        engine_kwargs(parse("serve", "a", "--model", "b"))
    # async scheduling is the engine's flag (default on), not a second server flag
    assert engine_kwargs(parse("serve"))["async_scheduling"] is True
    assert engine_kwargs(parse("serve", "--no-async-scheduling"))["async_scheduling"] is False


def test_help_shows_defaults() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["generate"]
    text = sub.format_help()
    assert "(default: 64)" in text  # --max-tokens
    assert "(default: 0.9)" in text  # --gpu-memory-utilization
    assert "512 on a GPU of 70 GiB or more" in " ".join(text.split())  # --max-num-seqs
    assert "--sampling-seed" in text and "engine seed" in text


def test_max_num_seqs_default_follows_device_memory(tiny_models) -> None:  # noqa: ANN001
    """vLLM's rule for big GPUs (more requests a step on 70 GiB or more), capped at our largest
    decode CUDA graph; set values are kept."""
    from compiled_llm.config import default_max_num_seqs

    assert default_max_num_seqs(None) == 256  # CPU
    assert default_max_num_seqs(40 * 2**30) == 256  # A100 40GB, L40S
    assert default_max_num_seqs(80 * 2**30) == 512  # H100
    assert default_max_num_seqs(141 * 2**30) == 512  # H200
    model = str(tiny_models("llama"))
    for given, expected in ((None, 256), (8, 8)):
        config = EngineArgs(model=model, device="cpu", max_num_seqs=given).create_config()
        assert config.scheduler_config.max_num_seqs == expected
        assert config.scheduler_config.max_num_batched_tokens == 8192


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"block_size": 3}, "block_size"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
        ({"max_model_len": 0}, "max_model_len"),
        ({"kv_cache_memory_bytes": 0}, "kv_cache_memory_bytes"),
        ({"num_gpu_blocks_override": 0}, "num_gpu_blocks_override"),
        ({"compilation_level": 3}, "compilation_level"),
        ({"load_format": "pt"}, "load_format"),
        ({"dtype": "float8"}, "dtype"),
        ({"attention_backend": "magic"}, "attention_backend"),
        ({"cudagraph_capture_sizes": [0]}, "cudagraph_capture_sizes"),
        ({"passes": ["+nonexistent"]}, "nonexistent"),
        ({"structured_outputs_matchers": "thread"}, "structured_outputs_matchers"),
    ],
)
def test_engine_args_validate_at_construction(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        EngineArgs(**kwargs)


def test_envs_are_read_in_one_place(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMPILED_LLM_API_KEY", "k")
    monkeypatch.setenv("COMPILED_LLM_FLASHINFER_PREFILL_BACKEND", "fa3")
    monkeypatch.setenv("CXX", "clang++")
    monkeypatch.delenv("COMPILED_LLM_DISABLE_COMPILE_CACHE", raising=False)
    e = envs.Envs.read()
    assert (e.api_key, e.flashinfer_prefill_backend, e.cxx) == ("k", "fa3", "clang++")
    assert not e.disable_compile_cache
    with envs.override(disable_compile_cache=True):
        assert envs.Envs.read().disable_compile_cache
    assert not envs.Envs.read().disable_compile_cache
    with pytest.raises(TypeError, match="nope"), envs.override(nope=1):
        pass


# Variables of other libraries, left where they are (see compiled_llm/envs.py).
_ALLOWED = {
    "attention_backends/triton_backend.py": {"TRITON_INTERPRET"},
    "attention_backends/flashinfer.py": {"FLASHINFER_WORKSPACE_BASE"},
}


def test_no_environment_reads_outside_envs() -> None:
    found = []
    for folder in ("compiled_llm", "passes", "attention_backends", "server"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel == "compiled_llm/envs.py":
                continue
            lines = path.read_text().splitlines()
            for i, line in enumerate(lines):
                if not re.search(r"os\.environ|os\.getenv|getenv\(", line):
                    continue
                call = " ".join(lines[i : i + 2])  # the name may sit on the next line
                names = set(re.findall(r"[\"']([A-Z][A-Z0-9_]+)[\"']", call))
                if not names or not names <= _ALLOWED.get(rel, set()):
                    found.append(f"{rel}: {line.strip()}")
    assert not found, "read environment variables through compiled_llm/envs.py:\n" + "\n".join(
        found
    )
