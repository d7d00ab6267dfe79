"""The transformers fallback (models/transformers_fallback.py): greedy outputs equal HF
transformers' `generate` (float32) on tiny random models of architectures we have no native class
for, Llama through the fallback equals our native Llama, -O1 equals eager, batches that mix
prefill and decode, and what is refused at load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compiled_llm import LLM, SamplingParams
from compiled_llm.config import EngineArgs
from compiled_llm.models.transformers_fallback import TransformersForCausalLM
from tests.conftest import TINY, assert_greedy_close, tokens
from tests.hf_reference import assert_matches_hf, hf_greedy

PROMPTS = [
    "Hi",
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Paged attention stores the KV cache in fixed-size blocks so that memory",
]
MAX_TOKENS = 8

# Tiny configs of architectures only the fallback serves, each with the fields that make it
# differ from Llama set away from their defaults where a default would hide a difference.
FALLBACK_ARCHS: dict[str, dict[str, object]] = {
    "GPTNeoX": dict(num_key_value_heads=None, rotary_pct=0.5),  # MHA only, partial RoPE
    "Olmo2": {},  # q/k norms over all heads, post-norms
    "Granite": dict(
        attention_multiplier=0.09,
        logits_scaling=2.0,
        embedding_multiplier=1.5,
        residual_multiplier=0.7,
    ),
    "StableLm": dict(partial_rotary_factor=0.5, use_qkv_bias=True),  # LayerNorm, partial RoPE
    "Starcoder2": {},  # LayerNorm with biases, GELU MLP
    "Phi3": {},  # fused qkv and gate_up projections
}


def make_hf_model(arch: str, path: Path, tokenizer_dir: Path, **overrides: object) -> Path:
    """A tiny random `<arch>ForCausalLM` saved as safetensors + config.json + our tokenizer."""
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    kwargs = dict(TINY, vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=2)
    kwargs.update(overrides)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    torch.manual_seed(0)
    config = getattr(transformers, f"{arch}Config")(**kwargs)
    getattr(transformers, f"{arch}ForCausalLM")(config).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory: pytest.TempPathFactory, embedded_tokenizer_dir: Path):
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            overrides = FALLBACK_ARCHS.get(arch, {})
            folder = tmp_path_factory.mktemp(f"hf-{arch}")
            cache[arch] = make_hf_model(arch, folder, embedded_tokenizer_dir, **overrides)
        return cache[arch]

    return get


def generate(llm: LLM, prompts: list[str], max_tokens: list[int]) -> list[list[int]]:
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in max_tokens]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def model_of(llm: LLM) -> torch.nn.Module:
    return llm.engine.core.runner.model


@pytest.mark.parametrize("arch", list(FALLBACK_ARCHS))
def test_fallback_matches_hf(arch: str, hf_models) -> None:
    path = hf_models(arch)
    lengths = [MAX_TOKENS] * len(PROMPTS)
    llm = LLM(str(path), max_model_len=256, enforce_eager=True)
    assert isinstance(model_of(llm), TransformersForCausalLM)  # model_impl auto: no native class
    assert_matches_hf(hf_greedy(path, PROMPTS, lengths), generate(llm, PROMPTS, lengths))


def test_mixed_prefill_and_decode(hf_models) -> None:
    """Two requests at a time and a small token budget: later prompts are prefilled (in chunks)
    in the same steps as earlier ones decode."""
    path = hf_models("Olmo2")
    prompts = [*PROMPTS, PROMPTS[3] * 2, PROMPTS[1]]
    lengths = [12, 3, 7, 5, 9, 1]
    llm = LLM(
        str(path),
        max_model_len=256,
        enforce_eager=True,
        max_num_seqs=2,
        max_num_batched_tokens=16,
        enable_prefix_caching=True,
    )
    runner = llm.engine.core.runner
    steps: list[list[int]] = []
    prepare = runner.prepare_inputs

    def record(scheduled, *args, **kwargs):
        steps.append([s.num_tokens for s in scheduled])
        return prepare(scheduled, *args, **kwargs)

    runner.prepare_inputs = record
    assert_matches_hf(hf_greedy(path, prompts, lengths), generate(llm, prompts, lengths))
    assert any(1 in step and max(step) > 1 for step in steps), steps  # decode beside prefill


def test_llama_through_fallback_matches_native(tiny_models) -> None:
    path = tiny_models("llama")
    lengths = [MAX_TOKENS] * len(PROMPTS)
    native = LLM(str(path), max_model_len=256, enforce_eager=True)
    fallback = LLM(str(path), max_model_len=256, enforce_eager=True, model_impl="transformers")
    assert not isinstance(model_of(native), TransformersForCausalLM)
    assert isinstance(model_of(fallback), TransformersForCausalLM)
    expected = hf_greedy(path, PROMPTS, lengths)
    ours = generate(native, PROMPTS, lengths)
    assert_matches_hf(expected, ours)
    assert_matches_hf(expected, generate(fallback, PROMPTS, lengths))
    assert generate(fallback, PROMPTS, lengths) == ours


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fallback_at_O2_on_cuda(gpu_models) -> None:
    """Compiled with CUDA graphs on the GPU (auto's backend: Triton), Llama
    through the fallback gives the eager torch-reference engine's float16 tokens (fp16 on both
    sides, so near-ties may flip: assert_greedy_close). Its compile used to fail there: fake runs
    without the Python dispatcher pinned the token count (passes/gemm_merge.py: _fake,
    compilation/backend.py: run_fake)."""
    path = str(gpu_models["llama"])
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=5)
    eager = LLM(path, dtype="float16", attention_backend="torch", enforce_eager=True)
    reference = tokens(eager.generate(PROMPTS, greedy, use_tqdm=False))
    del eager
    llm = LLM(
        path, dtype="float16", max_model_len=256, model_impl="transformers", compilation_level=2
    )
    assert isinstance(model_of(llm), TransformersForCausalLM)
    assert_greedy_close(reference, tokens(llm.generate(PROMPTS, greedy, use_tqdm=False)))
    assert llm.engine.core.runner.graphs.full_replays > 0


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(FALLBACK_ARCHS))
def test_compiled_equals_eager(arch: str, hf_models) -> None:
    """-O1: captured once by our compiler, split at each layer's attention op, equal to eager."""
    path = hf_models(arch)
    lengths = [MAX_TOKENS] * len(PROMPTS)
    eager = generate(LLM(str(path), max_model_len=256, enforce_eager=True), PROMPTS, lengths)
    llm = LLM(str(path), max_model_len=256, compilation_level=1)
    compiled = llm.engine.core.runner.compiled
    assert compiled is not None
    assert compiled.stats.num_pieces == TINY["num_hidden_layers"] + 1  # pieces between attentions
    assert generate(llm, PROMPTS, lengths) == eager
    assert_matches_hf(hf_greedy(path, PROMPTS, lengths), eager)


# --- refusals -------------------------------------------------------------------------------------
def config_only(path: Path, config: object) -> str:
    """A model folder with only config.json (refusals come before weights and tokenizer)."""
    config.save_pretrained(path)  # type: ignore[attr-defined]
    return str(path)


def start(path: str, **kwargs: object) -> LLM:
    return LLM(path, load_format="dummy", skip_tokenizer_init=True, max_model_len=64, **kwargs)


@pytest.mark.parametrize(
    ("arch", "overrides", "field"),
    [
        ("Olmo2", dict(alibi=True), "alibi"),
        ("Olmo2", dict(position_embedding_type="alibi"), "alibi"),
    ],
)
def test_unsupported_config_is_refused(tmp_path: Path, arch, overrides, field) -> None:
    import transformers

    config = getattr(transformers, f"{arch}Config")(**dict(TINY, vocab_size=128, **overrides))
    config.architectures = [f"{arch}ForCausalLM"]
    with pytest.raises(ValueError, match=rf"{arch}ForCausalLM.*{field}"):
        start(config_only(tmp_path, config))


@pytest.mark.parametrize(("arch", "applied"), [("Gemma2", 30.0), ("Olmo2", 0.0)])
def test_final_logit_cap_where_transformers_applies_it(tmp_path: Path, arch, applied) -> None:
    """Gemma 2's causal-LM forward soft-caps its logits by final_logit_softcapping; OLMo 2's
    ignores the field when a config sets it, and so does the fallback."""
    import transformers

    config = getattr(transformers, f"{arch}Config")(
        **dict(TINY, vocab_size=128, final_logit_softcapping=30.0)
    )
    config.architectures = [f"{arch}ForCausalLM"]
    llm = start(config_only(tmp_path, config), model_impl="transformers")
    assert model_of(llm).logit_soft_cap == applied


def test_attention_outside_the_interface_is_refused(tmp_path: Path) -> None:
    """BLOOM computes its ALiBi attention itself: the probe sees no layer call our function."""
    from transformers import BloomConfig

    config = BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=128)
    config.architectures = ["BloomForCausalLM"]
    with pytest.raises(ValueError, match="BloomForCausalLM.*attention interface"):
        start(config_only(tmp_path, config))


def test_encoder_decoder_is_refused(tmp_path: Path) -> None:
    from transformers import T5Config

    config = T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=4, vocab_size=128)
    config.architectures = ["T5ForConditionalGeneration"]
    with pytest.raises(ValueError, match="T5ForConditionalGeneration.*encoder-decoder"):
        start(config_only(tmp_path, config))


def test_model_impl_native_needs_a_native_class(tmp_path: Path) -> None:
    from transformers import GPTNeoXConfig

    config = GPTNeoXConfig(**dict(TINY, vocab_size=128, num_key_value_heads=None))
    config.architectures = ["GPTNeoXForCausalLM"]
    path = config_only(tmp_path, config)
    with pytest.raises(ValueError, match=r"model_impl.*GPTNeoXForCausalLM.*LlamaForCausalLM"):
        start(path, model_impl="native")
    with pytest.raises(ValueError, match="model_impl"):
        EngineArgs(model_impl="hf")


def test_remote_code_needs_trust(tmp_path: Path) -> None:
    config = {
        "model_type": "my_custom_lm",
        "architectures": ["MyCustomForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_my.MyConfig"},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trust_remote_code"):
        start(str(tmp_path))


def test_cli_flags() -> None:
    from compiled_llm.cli import build_parser
    from compiled_llm.cli.args import engine_kwargs

    args = build_parser().parse_args(
        ["generate", "hi", "--model-impl", "transformers", "--trust-remote-code"]
    )
    kwargs = engine_kwargs(args)
    assert kwargs["model_impl"] == "transformers" and kwargs["trust_remote_code"] is True


CUSTOM_CONFIG = """from transformers import Olmo2Config


class MyOlmoConfig(Olmo2Config):
    model_type = "my_olmo"
"""
CUSTOM_MODEL = """from transformers import Olmo2ForCausalLM

from .configuration_my import MyOlmoConfig


class MyOlmoForCausalLM(Olmo2ForCausalLM):
    config_class = MyOlmoConfig
"""


def test_trusted_remote_code_runs(tmp_path: Path, hf_models, monkeypatch) -> None:
    """A local folder with its own config and model classes (auto_map): refused without
    trust_remote_code, and with it runs through the fallback as the model it wraps does."""
    import shutil

    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    source = hf_models("Olmo2")
    folder = tmp_path / "custom"
    shutil.copytree(source, folder)
    (folder / "configuration_my.py").write_text(CUSTOM_CONFIG)
    (folder / "modeling_my.py").write_text(CUSTOM_MODEL)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="my_olmo",
        architectures=["MyOlmoForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_my.MyOlmoConfig",
            "AutoModelForCausalLM": "modeling_my.MyOlmoForCausalLM",
        },
    )
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trust_remote_code"):
        LLM(str(folder), max_model_len=256, enforce_eager=True)
    llm = LLM(str(folder), max_model_len=256, enforce_eager=True, trust_remote_code=True)
    assert type(model_of(llm).__dict__["_hf"]).__name__ == "MyOlmoForCausalLM"
    lengths = [MAX_TOKENS] * 2
    assert_matches_hf(hf_greedy(source, PROMPTS[:2], lengths), generate(llm, PROMPTS[:2], lengths))


def test_computed_buffers_match_transformers(hf_models) -> None:
    """Built on meta and materialized by to_empty(), the buffers transformers computes (RoPE
    frequencies) hold what from_pretrained gives, with checkpoint or dummy weights."""
    from transformers import AutoModelForCausalLM

    path = hf_models("GPTNeoX")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    expected = dict(hf.named_buffers())
    assert expected
    for load_format in ("auto", "dummy"):
        llm = LLM(str(path), max_model_len=256, enforce_eager=True, load_format=load_format)
        buffers = dict(model_of(llm).named_buffers())
        assert buffers.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(buffers[name], value, rtol=0, atol=0, msg=name)
