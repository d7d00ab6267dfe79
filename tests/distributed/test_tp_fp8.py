"""FP8 with tensor parallelism on CPU (gloo, 2 ranks; rank 0 in this process): online
`quantization="fp8"`, a per-channel compressed-tensors checkpoint (with an FP8 KV cache too), a
per-tensor one with static activation scales and a 128 x 128 block-scaled HF checkpoint, each
at TP=2 against TP=1 of the same checkpoint with the same settings. Oracles: rank 0's E4M3
weights and scales equal TP=1's slices of them bit for bit (online row-parallel scales included:
the channel maximum over the ranks), and greedy tokens equal TP=1's exactly (tolerance zero, as
TP=2 and TP=1 in test_tp_engine.py: float32, only the summation order differs).

With per-token activation scales (online, per-channel) one difference is by design: a
row-parallel layer's ranks each quantize their own slice of its input, with that slice's scale
(as vLLM's do; finer than one scale for the whole row, and no collective). On these tiny models,
whose top logits lie within FP8's noise of each other, that alone changes most first tokens, so
there the TP=1 oracle quantizes its o_proj / down_proj inputs per rank slice the same way
(`quantize_activations_per_rank`). Static scales, and block checkpoints' per-128-column
groups (which the ranks' slices hold whole), quantize as TP=1 does: compared with TP=1 as it is. Block checkpoints whose K/V
rows do not split into whole blocks are refused naming the layer. Eager (the FP8 graphs and
their passes are tested in tests/quantization)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from compiled_llm import LLM, SamplingParams
from compiled_llm.kernels.fp8 import fp8_linear
from compiled_llm.quantization.fp8 import Fp8Linear
from tests.conftest import make_tiny_model
from tests.distributed.test_tp_engine import PROMPTS, assert_no_workers_left, workers_of
from tests.quantization import emulation as E

ENGINE = dict(
    dtype="float32",
    max_model_len=128,
    enforce_eager=True,
    kv_cache_memory_bytes=1 << 21,
    max_num_batched_tokens=16,  # the 40-token prompts prefill in chunks
    max_num_seqs=4,
)
GREEDY = SamplingParams(max_tokens=8, temperature=0)
# Llama with biases (q/k/v and the MLP; the row-parallel o_proj / down_proj bias is added once,
# after the all-reduce); 64-wide heads.
BIASED = dict(attention_bias=True, mlp_bias=True)
# 128-wide heads, 2 KV heads: every sharded dim holds whole 128 x 128 blocks on each of 2 ranks.
WIDE = dict(hidden_size=256, intermediate_size=512, head_dim=128)
LAYER = "model.layers.0"


def quantize_activations_per_rank(model: nn.Module, world: int = 2) -> None:
    """TP=1's row-parallel layers (o_proj, down_proj) quantize their input in `world` column
    slices, each with its own per-token scale, and sum the slices' products, as the ranks of
    TP=world do."""
    for name, layer in model.named_modules():
        if not (isinstance(layer, Fp8Linear) and name.endswith(("o_proj", "down_proj"))):
            continue
        assert not layer.block_size and layer.input_scale is None

        def forward(x: torch.Tensor, layer: Fp8Linear = layer) -> torch.Tensor:
            k = layer.in_features // world
            parts = [
                fp8_linear(
                    x[..., r * k : (r + 1) * k],
                    layer.weight[:, r * k : (r + 1) * k],
                    layer.weight_scale,
                    None,
                    [],
                )
                for r in range(world)
            ]
            y = sum(parts[1:], parts[0])
            return y if layer.bias is None else y + layer.bias

        layer.forward = forward  # type: ignore[method-assign]


def run(
    path: Path, tp: int, patch: Callable[[nn.Module], None] | None = None, **kwargs: object
) -> tuple[list[list[int]], dict[str, torch.Tensor]]:
    """Greedy tokens and rank 0's first-layer tensors of q_proj and o_proj (a column- and a
    row-parallel layer); `patch` is applied to rank 0's model first."""
    llm = LLM(str(path), tensor_parallel_size=tp, **ENGINE, **kwargs)  # type: ignore[arg-type]
    procs = workers_of(llm) if tp > 1 else []
    try:
        runner = llm.engine.core.runner
        if "kv_cache_dtype" in kwargs:  # the workers run the same config
            assert runner.backend.spec.cache_dtype == torch.float8_e4m3fn
        if patch is not None:
            patch(runner.model)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
        layer = runner.model.get_submodule(LAYER)
        state = {
            f"{proj}.{n}": t.detach().clone()
            for proj in ("self_attn.q_proj", "self_attn.o_proj")
            for n, t in layer.get_submodule(proj).state_dict().items()
        }
        if tp > 1:
            o_proj = layer.self_attn.o_proj
            assert type(o_proj).__name__ == "Fp8Linear" and o_proj.tp.world_size == tp
    finally:
        llm.engine.core.shutdown()
    assert_no_workers_left(procs)
    return [o.outputs[0].token_ids for o in outs], state


def assert_rank0_holds_tp1_slices(whole: dict, shard: dict, block: int = 1) -> None:
    """q_proj: the first half of the rows of the weight, scales and bias; o_proj: the first half
    of the weight's columns, per-channel scales whole (block scales: the first half of their
    columns), the bias whole."""
    for name, full in whole.items():
        proj, leaf = name.rsplit(".", 1)
        part = shard[name]
        if leaf == "input_scale" or (
            leaf == "weight_scale" and full.shape[-1] == 1 and proj.endswith("o_proj")
        ):
            expected = full
        elif proj.endswith("q_proj"):
            expected = full[: full.shape[0] // 2]
        elif leaf in ("weight", "weight_scale"):
            expected = full[:, : full.shape[1] // 2]
        else:
            expected = full  # the row-parallel bias
        assert part.dtype == full.dtype, name
        assert torch.equal(part.float(), expected.float()), name
    assert whole["self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    if block > 1:
        assert whole["self_attn.o_proj.weight_scale"].shape[1] == 512 // block


def fp8_checkpoint(src: Path, tmp_path: Path, fmt: str) -> Path:
    dst = tmp_path / fmt
    E.write_checkpoint(src, dst, fmt, torch.tensor([PROMPTS[1]]))  # static scales' calibration
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("case", ["online", "ct-dynamic", "ct-static", "hf-block"])
def test_tp2_fp8_equals_tp1(case: str, tmp_path: Path, embedded_tokenizer_dir: Path) -> None:
    if case == "online":
        path = make_tiny_model("llama", tmp_path / "float", embedded_tokenizer_dir, **BIASED)
        kwargs: dict[str, object] = dict(quantization="fp8")
    elif case == "ct-dynamic":  # per-channel scales, with an FP8 KV cache as well
        src = make_tiny_model("llama", tmp_path / "float", embedded_tokenizer_dir, **BIASED)
        path, kwargs = fp8_checkpoint(src, tmp_path, case), dict(kv_cache_dtype="fp8")
    elif case == "ct-static":  # per-tensor weight scales, static activation scales: whole
        src = make_tiny_model("llama", tmp_path / "float", embedded_tokenizer_dir)
        path, kwargs = fp8_checkpoint(src, tmp_path, case), {}
    else:
        src = make_tiny_model("llama", tmp_path / "float", embedded_tokenizer_dir, **WIDE)
        path, kwargs = fp8_checkpoint(src, tmp_path, case), {}
    per_token = case in ("online", "ct-dynamic")
    single, whole = run(path, 1, quantize_activations_per_rank if per_token else None, **kwargs)
    sharded, shard = run(path, 2, **kwargs)
    assert_rank0_holds_tp1_slices(whole, shard, 128 if case == "hf-block" else 1)
    assert sharded == single


@pytest.mark.slow
def test_block_scales_that_do_not_split_are_refused(
    tmp_path: Path, embedded_tokenizer_dir: Path
) -> None:
    """64-wide heads: k_proj's 2 KV heads are 128 rows, 64 per rank, half a 128-row block. Every
    rank refuses alike at load; the user sees rank 0's ValueError and no worker is left."""
    src = make_tiny_model("llama", tmp_path / "float", embedded_tokenizer_dir, hidden_size=256)
    path = fp8_checkpoint(src, tmp_path, "hf-block")
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.k_proj'.*128-wide"):
        LLM(str(path), tensor_parallel_size=2, **ENGINE)  # type: ignore[arg-type]
    assert_no_workers_left([])
    assert not torch.distributed.is_initialized()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp2_fp8_equals_tp1_on_two_gpus(tmp_path: Path, embedded_tokenizer_dir: Path) -> None:
    """A 128 x 128 block FP8 checkpoint (4 layers, 128-wide heads) with an FP8 KV cache, bf16,
    at -O2 (CUDA graphs holding the NCCL all-reduces after the FP8 GEMMs; each rank's GEMM
    shapes are half of TP=1's, which the tuned table does not list: cuBLASLt or Triton by
    shape): TP=2 greedy tokens equal TP=1's up to near-ties (`assert_greedy_close`; the GPU
    kernels sum in a different order per shape)."""
    import gc

    from tests.conftest import assert_greedy_close, tokens

    src = make_tiny_model(
        "llama", tmp_path / "float", embedded_tokenizer_dir, **WIDE, num_hidden_layers=4
    )
    path = fp8_checkpoint(src, tmp_path, "hf-block")
    engine = dict(
        dtype="bfloat16",
        compilation_level=2,
        max_model_len=256,
        kv_cache_memory_bytes=1 << 28,
        kv_cache_dtype="fp8",
    )
    prompts = [[1, *range(10 + i, 10 + 7 * (i + 1))] for i in range(6)]
    params = SamplingParams(max_tokens=32, temperature=0, logprobs=5)

    def generate(tp: int) -> list:
        llm = LLM(str(path), tensor_parallel_size=tp, **engine)  # type: ignore[arg-type]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        llm.engine.core.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()
        return tokens(outs)

    assert_greedy_close(generate(1), generate(2))
