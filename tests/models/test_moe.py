"""Native MoE models (Qwen3-MoE, Mixtral) against HF transformers' greedy `generate` (float32),
token for token with the top-2 tie tolerance: one batch, chunked steps mixing prefill and decode,
and compiled (-O1) against eager with the decoder layers compiled as identical pieces. Checkpoints
in the Hub's per-expert layout and in transformers 5's stacked one load to the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compiled_llm import LLM
from compiled_llm.models.mixtral import MixtralForCausalLM
from compiled_llm.models.moe import SparseMoeBlock
from compiled_llm.models.qwen3_moe import Qwen3MoeForCausalLM
from tests.conftest import make_tiny_model
from tests.hf_reference import assert_matches_hf, hf_greedy
from tests.models.test_sliding_window import MAX_TOKENS, WINDOW, generate, prompts

# Few experts of a small intermediate size; more experts than top_k so routing matters.
MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)
MODELS = {
    # Qwen3-30B-A3B's routing: top-k renormalized; every layer sparse.
    "qwen3_moe": ("qwen3_moe", dict(MOE, norm_topk_prob=True)),
    # HF's default routing (top-k not renormalized), a dense layer between sparse ones.
    "qwen3_moe_mixed": (
        "qwen3_moe",
        dict(MOE, norm_topk_prob=False, num_hidden_layers=3, mlp_only_layers=[1]),
    ),
    # Mixtral with a sliding window shorter than every prompt.
    "mixtral": (
        "mixtral",
        dict(
            num_local_experts=6, num_experts_per_tok=2, intermediate_size=32, sliding_window=WINDOW
        ),
    ),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request, tmp_path_factory, embedded_tokenizer_dir):
    kind, overrides = MODELS[request.param]
    path = make_tiny_model(
        kind, tmp_path_factory.mktemp(f"moe-{request.param}"), embedded_tokenizer_dir, **overrides
    )
    from transformers import AutoConfig

    ids = prompts(int(AutoConfig.from_pretrained(path).vocab_size))
    return request.param, path, ids, hf_greedy(path, ids, MAX_TOKENS)


def test_one_batch_matches_hf(model) -> None:
    _, path, ids, expected = model
    llm = LLM(str(path), max_model_len=128, enforce_eager=True)
    blocks = [m for m in llm.engine.core.runner.model.modules() if isinstance(m, SparseMoeBlock)]
    assert blocks  # the native class with its sparse blocks, not the fallback
    assert_matches_hf(expected, generate(llm, ids))


def test_chunked_steps_mixing_prefill_and_decode_match_hf(model) -> None:
    """A 16-token budget and two requests at a time: prompts are prefilled in chunks in the same
    steps as earlier requests decode (tokens of several requests routed in one op call)."""
    _, path, ids, expected = model
    llm = LLM(
        str(path),
        max_model_len=128,
        enforce_eager=True,
        max_num_seqs=2,
        max_num_batched_tokens=16,
        enable_chunked_prefill=True,
        block_size=4,
    )
    runner = llm.engine.core.runner
    steps: list[list[int]] = []
    prepare = runner.prepare_inputs

    def record(scheduled, *args, **kwargs):
        steps.append([s.num_tokens for s in scheduled])
        return prepare(scheduled, *args, **kwargs)

    runner.prepare_inputs = record
    assert_matches_hf(expected, generate(llm, ids))
    assert any(1 in step and max(step) > 1 for step in steps), steps  # decode beside prefill


@pytest.mark.slow
def test_compiled_equals_eager(model) -> None:
    """-O1: the MoE op stays one opaque call inside the pieces; layers of one kind compile once
    (all-sparse: first, middle, last piece; with a dense layer in the middle, one more)."""
    name, path, ids, _ = model
    eager = LLM(str(path), max_model_len=128, enforce_eager=True)
    compiled = LLM(str(path), max_model_len=128, compilation_level=1)
    stats = compiled.engine.core.runner.compiled.stats
    layers = int(MODELS[name][1].get("num_hidden_layers", 2))
    assert stats.num_pieces == layers + 1
    assert stats.num_unique == (4 if name == "qwen3_moe_mixed" else 3)
    assert generate(compiled, ids) == generate(eager, ids)


@pytest.mark.gpu
def test_cuda_graphs_match_hf(model) -> None:
    """On CUDA in float32: the Triton experts inside -O2's CUDA graphs (piecewise for prefill
    steps, full-model for decode batches) give HF's greedy tokens (HF on the CPU)."""
    _, path, ids, expected = model
    llm = LLM(
        str(path),
        max_model_len=128,
        dtype="float32",
        attention_backend="triton",
        compilation_level=2,
        max_num_seqs=8,
    )
    graphs = llm.engine.core.runner.graphs
    assert graphs is not None
    assert_matches_hf(expected, generate(llm, ids))
    assert graphs.full_replays > 0 and graphs.piecewise_replays > 0


# --- weights ---------------------------------------------------------------------------------
def build(cls: type, config) -> torch.nn.Module:
    return cls(config, max_positions=64).eval()


@pytest.mark.parametrize("name", ["qwen3_moe_mixed", "mixtral"])
def test_stacked_and_per_expert_checkpoints_load_the_same(
    name: str, tmp_path: Path, embedded_tokenizer_dir
) -> None:
    """The Hub layout (what save_pretrained writes: one tensor per expert and projection,
    Mixtral's under block_sparse_moe with w1/w3/w2) and transformers 5's in-memory stacked
    layout (its state_dict: experts.gate_up_proj / down_proj) give equal parameters, and equal
    to HF's own stacked ones."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    kind, overrides = MODELS[name]
    path = make_tiny_model(kind, tmp_path, embedded_tokenizer_dir, **overrides)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    cls = Qwen3MoeForCausalLM if kind == "qwen3_moe" else MixtralForCausalLM
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        assert any(".experts.0." in n for n in names)  # per-expert on disk
        per_expert = build(cls, hf.config)
        per_expert.load_weights((n, f.get_tensor(n)) for n in names)
    stacked = build(cls, hf.config)
    stacked.load_weights(hf.state_dict().items())
    ours = dict(per_expert.named_parameters())
    for pname, tensor in hf.state_dict().items():
        assert torch.equal(ours[pname], tensor), pname
    for pname, param in stacked.named_parameters():
        assert torch.equal(param, ours[pname]), pname


def test_incomplete_or_mismatched_experts_are_refused(tmp_path: Path, embedded_tokenizer_dir):
    from safetensors import safe_open
    from transformers import AutoConfig

    kind, overrides = MODELS["mixtral"]
    path = make_tiny_model(kind, tmp_path, embedded_tokenizer_dir, **overrides)
    config = AutoConfig.from_pretrained(path)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118
    missing = {k: v for k, v in tensors.items() if ".experts.3.w3." not in k}
    with pytest.raises(ValueError, match=r"lacks 1 expert tensor.*layers\.0\.mlp\.experts"):
        build(MixtralForCausalLM, config).load_weights(missing.items())
    extra = dict(tensors)
    extra["model.layers.0.block_sparse_moe.experts.6.w1.weight"] = tensors[
        "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    ]
    with pytest.raises(ValueError, match="expert 6 of 6 experts"):
        build(MixtralForCausalLM, config).load_weights(extra.items())
    bad = dict(tensors)
    bad["model.layers.1.block_sparse_moe.experts.2.w2.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"experts\.2\.w2\.weight' has shape \(3, 3\)"):
        build(MixtralForCausalLM, config).load_weights(bad.items())


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("hidden_act", "gelu", "hidden_act='gelu'"),
        ("decoder_sparse_step", 0, "decoder_sparse_step=0"),
        ("num_experts_per_tok", 9, "num_experts_per_tok=9"),
    ],
)
def test_unsupported_config_is_refused(field: str, value: object, message: str) -> None:
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, **MOE,
    )  # fmt: skip
    setattr(config, field, value)
    with pytest.raises(ValueError, match=message):
        build(Qwen3MoeForCausalLM, config)
