"""FP8 models end to end on CPU: `quantization="fp8"` on a float checkpoint, and FP8 checkpoints
written here from a float model in each format we load, give greedy outputs equal token for
token to HF transformers' float32 model of the same weights run with FP8 linears emulated by
compressed-tensors (emulation.py): weights dequantized from the same E4M3 values, activations
quantized and dequantized per token (per 128-column group for block weights, or with the
checkpoint's static scale). Tolerance: none (exact greedy tokens), as the float32 models are
compared with HF in tests/models/test_models.py; what separates the two is float32 summation
order, far below the logits' gaps on these models.

How far FP8 moves outputs from the unquantized model is measured on the real embedded model:
benchmarks/perplexity.py (docs/quantization.md)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from compiled_llm import LLM, SamplingParams
from tests.conftest import make_tiny_model
from tests.hf_reference import greedy_tokens, hf_greedy
from tests.models.test_models import PROMPTS as ALL_PROMPTS
from tests.quantization import emulation as E

PROMPTS = ALL_PROMPTS[1:6]  # short and long ones; each check decodes them all
NEW_TOKENS = 10
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def engine_greedy(path: Path, level: int, **kwargs: object) -> tuple[list[list[int]], LLM]:
    llm = LLM(str(path), max_model_len=512, compilation_level=level, device="cpu", **kwargs)
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs], llm


def emulated_greedy(src: Path, weights: dict, act: object) -> list[list[int]]:
    """HF's float32 model of `src` (the float checkpoint) with FP8 linears emulated."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    static = {n: v[2] for n, v in weights.items() if v[2] is not None}
    E.emulate(hf, {n: (w, b) for n, (w, b, _) in weights.items()}, act, static)
    tokenizer = AutoTokenizer.from_pretrained(src)
    return greedy_tokens(hf_greedy(hf, PROMPTS, NEW_TOKENS, tokenizer=tokenizer))


def online_weights(path: Path) -> dict:
    """Each linear's weight quantized per output channel by compressed-tensors."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    weights = {}
    for name in E.linear_names(hf):
        module = hf.get_submodule(name)
        q, scale = E.ct_quantize(module.weight.detach(), "channel")
        weights[name] = (E.dequant(q, scale, None), module.bias, None)
    return weights


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory: pytest.TempPathFactory, embedded_tokenizer_dir: Path) -> Path:
    """A tiny Llama wide enough for 2 x 2 blocks of 128 x 128 in q_proj (k/v: 2 x 1)."""
    path = tmp_path_factory.mktemp("wide-llama")
    return make_tiny_model(
        "llama", path, embedded_tokenizer_dir, hidden_size=256, intermediate_size=512
    )


def checkpoint(src: Path, tmp_path: Path, fmt: str) -> tuple[Path, dict]:
    from transformers import AutoTokenizer

    calib = AutoTokenizer.from_pretrained(src)(" ".join(PROMPTS), return_tensors="pt").input_ids
    dst = tmp_path / fmt
    shutil.rmtree(dst, ignore_errors=True)
    return dst, E.write_checkpoint(src, dst, fmt, calib)


ACT = {
    "online": E.args("token", dynamic=True),
    "ct-dynamic": E.args("token", dynamic=True),
    "hf-tensor": E.args("token", dynamic=True),
    "ct-static": E.args("tensor"),
    "hf-block": E.args("group", dynamic=True, group_size=128),
}


def test_online_fp8_equals_emulation(tiny_models) -> None:
    path = tiny_models("llama")
    got, llm = engine_greedy(path, 0, quantization="fp8")
    assert got == emulated_greedy(path, online_weights(path), ACT["online"])
    model = llm.engine.core.runner.model
    kinds = {type(m).__name__ for n, m in model.named_modules() if n.endswith("_proj")}
    assert kinds == {"Fp8Linear"}
    assert model.lm_head.weight.dtype == torch.float32  # the head stays in full precision


@pytest.mark.parametrize("fmt", ["ct-dynamic", "ct-static", "hf-tensor"])
def test_checkpoint_equals_emulation(fmt: str, tiny_models, tmp_path: Path) -> None:
    src = tiny_models("llama")
    path, weights = checkpoint(src, tmp_path, fmt)
    got, _ = engine_greedy(path, 0)
    assert got == emulated_greedy(src, weights, ACT[fmt])


@pytest.mark.slow
def test_block_checkpoint_equals_emulation(wide_llama: Path, tmp_path: Path) -> None:
    path, weights = checkpoint(wide_llama, tmp_path, "hf-block")
    got, llm = engine_greedy(path, 0)
    assert got == emulated_greedy(wide_llama, weights, ACT["hf-block"])
    q_proj = llm.engine.core.runner.model.model.layers[0].self_attn.q_proj
    assert q_proj.block_size == [128, 128] and q_proj.weight_scale.shape == (2, 2)


# Sites in the 2-layer models, over the whole model: q/k/v and gate/up merged per layer; per
# layer two norms feeding FP8 GEMMs (the first layer's input norm alone, the others after a
# residual add) and one SiLU-and-mul feeding down_proj.
FUSIONS = {"gemm_merge": 4, "fuse_norm_quant": 4, "fuse_act_quant": 2}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["online", "ct-static", "hf-block"])
def test_compiled_equals_emulation(fmt: str, tiny_models, wide_llama: Path, tmp_path) -> None:
    """-O1 with the default pipeline of an FP8 model: q/k/v and gate/up GEMMs merged (static
    scales too: q/k/v read one input, so their calibrated scales are equal), norms and the
    activation fused with the quantization after them where the activations are quantized
    dynamically, and still the emulation's tokens."""
    from compiled_llm.compilation.cache import no_compile_caches

    src = wide_llama if fmt == "hf-block" else tiny_models("llama")
    if fmt == "online":
        path, weights, kwargs = src, online_weights(src), {"quantization": "fp8"}
    else:
        (path, weights), kwargs = checkpoint(src, tmp_path, fmt), {}
    with no_compile_caches():  # so every post-grad pass runs and counts its matches
        got, llm = engine_greedy(path, 1, **kwargs)
    compiled = llm.engine.core.runner.compiled
    assert compiled is not None
    stats = compiled.pipeline.stats
    matches = {n: stats[n].matches(compiled.stats.instances) for n in FUSIONS if n in stats}
    # Static scales: no dynamic quantization to fuse (the fusions match nothing).
    expected = dict(FUSIONS, fuse_norm_quant=0, fuse_act_quant=0) if fmt == "ct-static" else FUSIONS
    assert matches == expected
    assert got == emulated_greedy(src, weights, ACT[fmt])


def test_wrong_weight_dtype_is_refused(tiny_models, tmp_path: Path) -> None:
    """A config that says FP8 over float weights fails at load, naming the tensor."""
    import json

    path = tmp_path / "mislabelled"
    shutil.copytree(tiny_models("llama"), path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = E.quantization_config("ct-dynamic")
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"_proj\.weight' is torch.float32.*float8_e4m3fn"):
        LLM(str(path), max_model_len=512, enforce_eager=True, device="cpu")


def test_moe_router_stays_in_full_precision(tiny_models) -> None:
    """FP8 quantizes the attention projections of an MoE model but not its routers (as vLLM):
    each router is the checkpoint's float weight, bit for bit."""
    from safetensors.torch import load_file

    path = tiny_models("qwen3_moe")
    _, llm = engine_greedy(path, 0, quantization="fp8")
    model = llm.engine.core.runner.model
    saved = {}
    for f in sorted(path.glob("*.safetensors")):
        saved.update(load_file(f))
    routers = {n: m for n, m in model.named_modules() if n.endswith("mlp.gate")}
    assert routers
    for name, router in routers.items():
        assert type(router) is torch.nn.Linear, name
        assert torch.equal(router.weight, saved[f"{name}.weight"].to(router.weight.dtype)), name
    kinds = {type(m).__name__ for n, m in model.named_modules() if n.endswith("o_proj")}
    assert kinds == {"Fp8Linear"}
