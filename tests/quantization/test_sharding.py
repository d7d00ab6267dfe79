"""FP8 under tensor parallelism, in one process (the 2-rank engines are in
tests/distributed/test_tp_fp8.py): which slice of each FP8 checkpoint tensor a rank reads, checked
against the oracle of quantizing the rank's slice of the float weight itself (block and
per-channel scales computed from the slice equal the slice of the whole tensor's scales), and a
block-scaled dim that does not split into whole blocks refused naming its layer."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from compiled_llm.distributed.parallel import TensorParallel
from compiled_llm.distributed.plan import ShardPlan
from compiled_llm.distributed.transform import shard_model
from compiled_llm.kernels.fp8 import quantize, quantize_weight
from compiled_llm.models.llama import LlamaForCausalLM
from compiled_llm.quantization.config import QuantizationConfig
from compiled_llm.quantization.fp8 import Fp8Linear, Fp8Method

BLOCK = (128, 128)
LAYER = "model.layers.0"
# k/v: 2 KV heads of 128 = 256 rows, 128 per rank; o_proj and down_proj: 512 input columns
SHAPE = dict(
    hidden_size=256,
    intermediate_size=512,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=128,
    num_hidden_layers=1,
    vocab_size=64,
)
CONFIGS = {
    "block": QuantizationConfig("fp8", "fp8", "block", BLOCK, "group"),
    "channel": QuantizationConfig("fp8", "compressed-tensors", "channel", None, "token"),
    "tensor": QuantizationConfig("fp8", "fp8", "tensor", None, "token"),
}


def prepared(rank: int, config: QuantizationConfig, **shape: int) -> tuple[Fp8Method, object]:
    """Rank `rank` of 2's shard of a Llama on the meta device, prepared for an FP8 checkpoint."""
    cfg = LlamaConfig(**{**SHAPE, **shape})
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, 64)
        plan = ShardPlan(TensorParallel(rank, 2), cfg.num_attention_heads, cfg.num_key_value_heads)
        shard_model(model, plan)
        method = Fp8Method(config)
        method.prepare(model)
    return method, method.checkpoint_slices(model, plan.spec)


@pytest.mark.parametrize("kind", ["block", "channel"])
def test_scales_are_read_with_their_weight_slices(kind: str) -> None:
    """Per projection: the rank's slice of the checkpoint's quantized weight and scales equals
    quantizing the rank's slice of the float weight (a row-parallel per-channel layer with the
    whole channel's scale), bit for bit."""
    torch.manual_seed(0)
    block = BLOCK if kind == "block" else None
    scale_name = "weight_scale_inv" if kind == "block" else "weight_scale"
    for rank in range(2):
        _, rule = prepared(rank, CONFIGS[kind])
        for proj, (n, k) in {
            "self_attn.q_proj": (512, 256),
            "self_attn.k_proj": (256, 256),
            "self_attn.o_proj": (256, 512),
            "mlp.up_proj": (512, 256),
            "mlp.down_proj": (256, 512),
        }.items():
            w = torch.randn(n, k)
            q, scale = quantize_weight(w, block)  # the checkpoint's tensors
            spec = rule(f"{LAYER}.{proj}.weight")
            assert spec is not None
            w_part = spec.read(w)
            scale_spec = rule(f"{LAYER}.{proj}.{scale_name}")
            if kind == "channel" and spec.dim == 1:
                assert scale_spec is None  # every rank holds part of every output channel
                expected = quantize(w_part, scale), scale
            else:
                assert scale_spec == spec
                expected = quantize_weight(w_part, block)
            got = spec.read(q), scale if scale_spec is None else scale_spec.read(scale)
            assert torch.equal(got[0].float(), expected[0].float()), (rank, proj)
            assert torch.equal(got[1], expected[1]), (rank, proj)
            assert rule(f"{LAYER}.{proj}.input_scale") is None


def test_per_tensor_scales_are_read_whole() -> None:
    _, rule = prepared(1, CONFIGS["tensor"])
    for proj in ("self_attn.q_proj", "self_attn.o_proj"):
        assert rule(f"{LAYER}.{proj}.weight") is not None
        assert rule(f"{LAYER}.{proj}.weight_scale") is None


def test_row_parallel_layers_keep_their_all_reduce() -> None:
    cfg = LlamaConfig(**SHAPE)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, 64)
        shard_model(model, ShardPlan(TensorParallel(1, 2), 4, 2))
        Fp8Method(CONFIGS["channel"]).prepare(model)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.o_proj, Fp8Linear) and attn.o_proj.tp == TensorParallel(1, 2)
    assert attn.o_proj.in_features == 256 and attn.o_proj.weight_scale.shape == (256, 1)
    assert isinstance(attn.q_proj, Fp8Linear) and attn.q_proj.tp is None
    assert attn.q_proj.out_features == 256


def test_blocks_that_do_not_split_are_refused_naming_the_layer() -> None:
    """64-wide heads: k_proj's 128 rows (2 KV heads) give 64 per rank, half a 128-row block."""
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.k_proj'.*64 of its"):
        prepared(0, CONFIGS["block"], head_dim=64)
