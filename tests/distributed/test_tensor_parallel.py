"""Tensor parallelism on CPU (gloo, 2 ranks): each rank's shard of a tiny model, loaded from its
slices of the safetensors file, gives the unsharded model's hidden states and logits (float32,
rtol = atol = 1e-5), eagerly and compiled at -O1; the shard plan reads the right slices and
refuses head counts that do not split."""

from __future__ import annotations

import queue
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from compiled_llm.distributed.parallel import TensorParallel
from compiled_llm.distributed.plan import ShardPlan, ShardSpec
from compiled_llm.distributed.transform import RowParallelLinear, shard_model
from compiled_llm.models.llama import LlamaForCausalLM
from tests.conftest import make_tiny_model
from tests.distributed import tp_worker

WORLD = 2
TIMEOUT_S = 240
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(cases: list[tp_worker.Case], device_type: str = "cpu") -> list[list[dict]]:
    """Spawn WORLD ranks running `tp_worker.main` on `cases`; each rank's results."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=tp_worker.main,
            args=(rank, WORLD, port, cases, results, device_type),
            daemon=True,
        )
        for rank in range(WORLD)
    ]
    for p in procs:
        p.start()
    got: dict[int, object] = {}
    try:
        for _ in procs:
            rank, out = results.get(timeout=TIMEOUT_S)
            got[rank] = out
    except queue.Empty:
        pytest.fail(f"ranks did not finish in {TIMEOUT_S} s (answered: {sorted(got)})")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = {rank: out for rank, out in got.items() if isinstance(out, str)}
    assert not errors, errors
    return [got[rank] for rank in range(WORLD)]  # type: ignore[misc]


@pytest.fixture(scope="module")
def models(tmp_path_factory, embedded_tokenizer_dir) -> dict[str, Path]:
    specs = {
        "llama_gqa": ("llama", {}),  # 4 heads, 2 KV heads: KV heads split
        # 1 KV head: replicated; row-parallel biases (added once, after the reduce)
        "llama_mqa": ("llama", dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True)),
        "qwen3": ("qwen3", {}),
        "gemma3": ("gemma3", {}),
        "qwen3_moe": ("qwen3_moe", dict(MOE, num_hidden_layers=3, mlp_only_layers=[1])),
    }
    return {
        name: make_tiny_model(kind, tmp_path_factory.mktemp(name), embedded_tokenizer_dir, **kw)
        for name, (kind, kw) in specs.items()
    }


@pytest.mark.slow
def test_shards_equal_the_whole_model(models, tmp_path: Path) -> None:
    """All families eagerly, and Llama-GQA with rank 0 compiled at -O1 (its all-reduces in the
    graph) and rank 1 eager: compiling on one rank only halves the test's time on 2 cores, and
    the ranks' graphs are the same code on the same shapes."""
    names = list(models)
    dump = tmp_path / "dumps"
    cases = [(str(models[n]), str(dump), ()) for n in names]
    cases.append((str(models["llama_gqa"]), str(dump), (0,)))
    ranks = run_ranks(cases)  # each rank asserted equality with the whole model itself

    # Memory: each sharded parameter holds 1/WORLD of the whole one's elements; exactly the
    # attention and MLP/expert projections are sharded (KV projections only where the KV heads
    # split: the 1-KV-head model replicates them); embeddings, lm_head, norms, routers and the
    # row-parallel biases are not.
    sharded = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for rank_out in ranks:
        for name, out in zip([*names, "llama_gqa (-O1)"], rank_out, strict=True):
            shard, whole = out["shard"], out["whole"]
            assert shard.keys() == whole.keys(), name
            for n in whole:
                kv_replicated = name == "llama_mqa" and ("k_proj" in n or "v_proj" in n)
                row_bias = n.endswith(("o_proj.bias", "down_proj.bias"))  # added after the reduce
                if any(s in n for s in sharded) and not kv_replicated and not row_bias:
                    assert shard[n] * WORLD == whole[n], (name, n)
                else:
                    assert shard[n] == whole[n], (name, n)

    # Compiled: the graph Dynamo captured holds one functional all-reduce (and its wait) per
    # row-parallel linear (o_proj, down_proj: two per layer), and still splits into
    # first / one middle layer / last pieces.
    assert ranks[0][-1]["pieces"] == 3
    graph = next((dump / "rank0" / "graph").glob("*attention_lowering.before.txt")).read_text()
    assert graph.count("target=torch.ops._c10d_functional.all_reduce]") == 2 * 2
    assert graph.count("target=torch.ops._c10d_functional.wait_tensor]") == 2 * 2
    # ...and so does each decoder layer's post-grad piece Inductor compiles, where an
    # all-reduce + add + RMSNorm fusion pass will find them.
    pieces = (dump / "rank0").glob("*/*noop_elimination.before.txt")
    reduces = sorted(p.read_text().count("_c10d_functional.all_reduce.default") for p in pieces)
    assert reduces == [0, 2, 2], reduces  # last piece (final norm), first and middle layer


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_shards_equal_the_whole_model_on_two_gpus(models, tmp_path: Path) -> None:
    """The same on two GPUs with NCCL (float32, rtol = atol = 1e-4), both ranks compiled at -O1
    for Llama-GQA and Qwen3-MoE (the experts' all-reduce hook traced by Dynamo)."""
    cases = [(str(path), str(tmp_path / "eager"), ()) for path in models.values()]
    cases.append((str(models["llama_gqa"]), str(tmp_path / "llama"), (0, 1)))
    cases.append((str(models["qwen3_moe"]), str(tmp_path / "moe"), (0, 1)))
    ranks = run_ranks(cases, "cuda")
    assert all(out[-2]["pieces"] == 3 and out[-1]["pieces"] == 4 for out in ranks)


# --- the plan and the transform, in one process ----------------------------------------------


def plan(rank: int, world: int, heads: int = 4, kv_heads: int = 2) -> ShardPlan:
    return ShardPlan(TensorParallel(rank, world), heads, kv_heads)


def test_plan_reads_each_ranks_slice() -> None:
    full = torch.arange(8 * 6).reshape(8, 6)
    layer = "model.layers.0"
    for rank in range(2):
        p = plan(rank, 2)
        rows, cols = slice(4 * rank, 4 * rank + 4), slice(3 * rank, 3 * rank + 3)
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.up_proj"):
            for kind in ("weight", "bias"):
                spec = p.spec(f"{layer}.{proj}.{kind}")
                assert spec is not None
                assert torch.equal(spec.read(full), full[rows])
        for proj in ("self_attn.o_proj", "mlp.down_proj"):
            spec = p.spec(f"{layer}.{proj}.weight")
            assert spec is not None
            assert torch.equal(spec.read(full), full[:, cols])
            assert p.spec(f"{layer}.{proj}.bias") is None  # added once, after the reduce
        for name in ("model.embed_tokens.weight", "lm_head.weight", f"{layer}.mlp.gate.weight"):
            assert p.spec(name) is None
        # per-expert checkpoint tensors follow the dense rules (Qwen3-MoE and Mixtral names)
        assert p.spec(f"{layer}.mlp.experts.3.gate_proj.weight") == ShardSpec(0, rank, 2)
        assert p.spec(f"{layer}.block_sparse_moe.experts.0.w2.weight") == ShardSpec(1, rank, 2)
        # stacked experts [E, 2I, H]: this rank's rows of the gate half and of the up half
        stacked = torch.arange(2 * 8 * 3).reshape(2, 8, 3)
        spec = p.spec(f"{layer}.mlp.experts.gate_up_proj")
        assert spec is not None
        expected = torch.cat(
            [stacked[:, 2 * rank : 2 * rank + 2], stacked[:, 4 + 2 * rank :][:, :2]], 1
        )
        assert torch.equal(spec.read(stacked), expected)


def test_plan_reads_safetensors_slices(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    full = torch.randn(8, 6)
    save_file({"w": full}, str(tmp_path / "w.safetensors"))
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        assert torch.equal(ShardSpec(0, 1, 2).read(f.get_slice("w")), full[4:])
        assert torch.equal(ShardSpec(1, 0, 3).read(f.get_slice("w")), full[:, :2])


def test_replicated_kv_heads_follow_the_query_heads() -> None:
    """8 query heads, 2 KV heads over 4 ranks: ranks 0-1 hold KV head 0, ranks 2-3 head 1."""
    for rank in range(4):
        p = plan(rank, 4, heads=8, kv_heads=2)
        assert p.spec("model.layers.0.self_attn.v_proj.weight") == ShardSpec(0, rank // 2, 2)
        assert p.local_heads == (2, 1)
    assert plan(0, 2, heads=8, kv_heads=8).local_heads == (4, 4)


@pytest.mark.parametrize(
    ("world", "heads", "kv_heads", "field"),
    [(3, 4, 2, "num_attention_heads"), (2, 6, 3, "num_key_value_heads"), (4, 12, 3, "num_key")],
)
def test_plan_refuses_heads_that_do_not_split(world, heads, kv_heads, field) -> None:
    with pytest.raises(ValueError, match=field):
        plan(0, world, heads, kv_heads)


def test_transform_narrows_the_meta_model(models) -> None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(models["llama_gqa"])
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, 64)
    whole = {n: p.shape for n, p in model.named_parameters()}
    shard_model(model, plan(1, 2))
    attn = model.model.layers[0].self_attn
    assert type(attn.q_proj) is torch.nn.Linear and attn.q_proj.out_features == 32
    assert isinstance(attn.o_proj, RowParallelLinear) and attn.o_proj.in_features == 32
    assert isinstance(model.model.layers[1].mlp.down_proj, RowParallelLinear)
    assert all(p.is_meta for p in model.parameters())  # nothing allocated
    assert sum(p.numel() for p in model.parameters()) < sum(s.numel() for s in whole.values())


def test_gguf_and_fallback_are_refused() -> None:
    from types import SimpleNamespace

    from compiled_llm.models.loader import check_shardable

    with pytest.raises(ValueError, match="GGUF"):
        check_shardable(SimpleNamespace(model="/x/model.gguf", model_impl="native"))
    with pytest.raises(ValueError, match="transformers fallback"):
        check_shardable(SimpleNamespace(model="/x/folder", model_impl="transformers"))
