"""The shipped passes together in the engine (-O1 greedy output equal to eager, every pass
matching where the model has its pattern), the pipeline's order and defaults, the worked
example of docs/passes.md loaded by dotted path, and `compiled-llm passes list/report`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from compiled_llm import LLM, SamplingParams
from compiled_llm.cli import main
from compiled_llm.compilation.cache import no_compile_caches
from compiled_llm.passes.registry import builtin_names, resolve_pipeline
from tests.passes.harness import compile_with_passes, dynamic

EXAMPLE = "tests.example_user_pass:SwiGLUPass"
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPTS = ["The compiler fuses", "x", "a longer prompt that is prefilled in one go " * 3]
# Every built-in pass but rope_kv_write, which takes RoPE away from the post-grad RoPE fusions
# counted here (tests/passes/test_rope_kv_write.py runs it with all the others).
ALL = [f"+{n}" for n in builtin_names() if n != "rope_kv_write"]
# Sites in the 2-layer tiny models, over the whole model.
EXPECTED = {
    "qwen2": {"gemm_merge": 4, "rope": 4, "fuse_add_rmsnorm": 5, "silu_and_mul": 2},
    "qwen3": {"gemm_merge": 4, "qk_norm_rope": 4, "rope": 0, "fuse_add_rmsnorm": 5},
}


def test_default_pipeline_and_order() -> None:
    names = [c.name for c in resolve_pipeline([])]
    assert names == ["attention_lowering", "gemm_merge", "noop_elimination"]
    edited = [c.name for c in resolve_pipeline(["+silu_and_mul", f"+{EXAMPLE}", "+rope"])]
    assert edited == names + ["rope", "silu_and_mul", "example_swiglu"]  # user passes last


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_all_passes_in_the_engine(kind: str, tiny_models) -> None:
    path = tiny_models(kind)
    eager = LLM(str(path), max_model_len=256, enforce_eager=True)
    with no_compile_caches():  # so every post-grad pass runs and counts its matches
        llm = LLM(str(path), max_model_len=256, compilation_level=1, passes=ALL)
    compiled = llm.engine.core.runner.compiled
    assert compiled is not None
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    expected = eager.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]
    matches = {n: s.matches(compiled.stats.instances) for n, s in compiled.pipeline.stats.items()}
    assert matches.items() >= EXPECTED[kind].items(), matches


def test_example_user_pass_by_dotted_path() -> None:
    def mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
        return F.silu(x @ w_gate) * (x @ w_up)

    x, wg, wu = torch.randn(5, 16), torch.randn(16, 32), torch.randn(16, 32)
    c = compile_with_passes(mlp, [EXAMPLE])
    with torch.no_grad():
        torch.testing.assert_close(c.fn(*dynamic(x.clone()), wg, wu), mlp(x, wg, wu))
    assert c.before["example.swiglu.default"] == 0 and c.after["example.swiglu.default"] == 1
    assert c.after["aten.exp.default"] == 0  # the decomposed silu is gone
    assert c.matches("example_swiglu") == 1


def test_passes_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["passes", "list"]) == 0
    out = capsys.readouterr().out
    for name in builtin_names():
        assert name in out
    assert "gemm_merge           graph      on" in out
    assert "silu_and_mul         post_grad  off" in out
    assert "rope_kv_write        graph      off" in out


@pytest.mark.slow
def test_passes_report_with_a_user_pass(
    tiny_models, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report_json = tmp_path / "report.json"
    argv = ["passes", "report", str(tiny_models("llama")), "--max-model-len", "256"]
    # Only the example on top of the required lowering: two compiles (with and without it).
    argv += [f"--passes=-gemm_merge,-noop_elimination,-onednn_linear,+{EXAMPLE}"]
    argv += ["--num-tokens", "16"]
    argv += ["--steps", "2"]
    assert main(argv + ["--json", str(report_json)]) == 0
    out = capsys.readouterr().out
    assert "example_swiglu" in out and "eager (-O0)" in out
    report = json.loads(report_json.read_text())
    assert report["pipeline"] == ["attention_lowering", "example_swiglu"]
    [row] = report["rows"]
    assert row["name"] == "example_swiglu" and row["stage"] == "post_grad"
    assert row["matches"] == 2  # one per layer
    assert row["nodes_after"] < row["nodes_before"]
    assert row["ms_on"] > 0 and row["ms_off"] > 0 and row["diff_on"] < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_all_passes_on_cuda_bf16(kind: str, tiny_models) -> None:
    """The Triton kernels inside Inductor's CUDA pieces: every fusion matches and the logits
    stay as close to eager as the unfused compiled model's."""
    from compiled_llm.compilation.report import run_report

    # triton attention: the tiny models have head_dim 16, which FlashInfer does not support
    engine = {
        "model": str(tiny_models(kind)),
        "max_model_len": 256,
        "dtype": "bfloat16",
        "attention_backend": "triton",
    }
    report = run_report(dict(engine, passes=ALL), num_tokens=32, steps=3)
    matches = {r.name: r.matches for r in report.rows}
    expected = {"gemm_merge": 4, "fuse_add_rmsnorm": 5, "silu_and_mul": 2}
    expected.update({"qk_norm_rope": 4} if kind == "qwen3" else {"rope": 4})
    assert matches.items() >= expected.items(), matches
    assert report.all_diff <= 2 * report.none_diff + 0.05, (report.all_diff, report.none_diff)
