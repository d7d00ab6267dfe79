"""rope_kv_write: RoPE of q and k plus the KV write become the backend's fused op.

On real Dynamo graphs of Llama, Qwen2 and Qwen3 (RoPE after its q/k norm), float32 and bf16: op
counts before/after, outputs and KV caches equal to eager, and nothing changed for a backend that
does not accept the op. In the engine (-O1, torch backend): greedy outputs equal eager, the fused
op runs with attention in the eager piece, layers still compile once, nothing recompiles. On CUDA
(`gpu`): -O2 with the Triton and FlashInfer ops equals -O0.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import fx, nn
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import FakeTensorMode

from compiled_llm import LLM
from compiled_llm.attention_backends.base import AttentionInputs, AttentionSpec
from compiled_llm.attention_backends.ops import attention, backend_ops
from compiled_llm.attention_backends.torch_ref import TorchAttentionBackend
from compiled_llm.compilation.cache import no_compile_caches
from compiled_llm.forward_context import ForwardContext, set_forward_context
from compiled_llm.layers.rotary import apply_rotary
from compiled_llm.models.registry import get_model_class
from compiled_llm.passes.attention_lowering import AttentionLoweringPass
from compiled_llm.passes.base import PassContext
from compiled_llm.passes.manager import PassPipeline
from compiled_llm.passes.registry import builtin_names
from compiled_llm.passes.rope_kv_write import RopeKVWritePass
from tests.compilation.test_compile import GREEDY, PROMPTS, token_ids
from tests.conftest import TINY
from tests.passes.harness import dynamic, op_counts

OPS = backend_ops("torch")
FUSED, KV_WRITE, ATTENTION = (str(op) for op in (OPS.rope_kv_write, OPS.kv_write, OPS.attention))
KINDS = ["llama", "qwen2", "qwen3"]
BLOCK = 4


# --- real model graphs, run eagerly --------------------------------------------------------------
def tiny_model(kind: str, dtype: torch.dtype) -> nn.Module:
    import transformers

    cfg_cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }[kind]
    cfg = cfg_cls(**dict(TINY, vocab_size=97, **({"head_dim": 16} if kind == "qwen3" else {})))
    torch.manual_seed(0)
    model = get_model_class(cfg)(cfg, 64)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return model.to(dtype).eval()


def forward_context(cfg: Any, dtype: torch.dtype, lens: tuple[int, ...]) -> ForwardContext:
    """Prefills of `lens` tokens in fresh pages, plus one padding token (slot -1)."""
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    spec = AttentionSpec(
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        head_dim,
        BLOCK,
        dtype,
        torch.device("cpu"),
        head_dim**-0.5,
    )
    backend = TorchAttentionBackend(spec)
    pages = [-(-n // BLOCK) for n in lens]
    caches = [c.zero_() for c in backend.allocate_kv_caches(sum(pages), cfg.num_hidden_layers)]
    table = np.zeros((len(lens), max(pages)), dtype=np.int32)
    first = 0
    for i, p in enumerate(pages):
        table[i, :p] = np.arange(first, first + p)
        first += p
    inputs, _ = AttentionInputs.from_batch(
        np.array(lens),
        np.array(lens),
        table,
        BLOCK,
        torch.device("cpu"),
        num_padded_tokens=sum(lens) + 1,
    )
    return ForwardContext(backend, caches, backend.build_metadata(inputs))


@dataclass
class Rewritten:
    fn: Callable[..., Any]
    before: Counter[str]  # call_function ops after attention_lowering
    after: Counter[str]  # ... and after rope_kv_write
    graph_before: str = ""
    graph_after: str = ""
    matches: int = 0


def rewrite(fn: Callable[..., Any], dtype: torch.dtype) -> Rewritten:
    """`fn`'s Dynamo graph lowered, then rewritten by rope_kv_write (torch backend); the
    rewritten graph runs eagerly (no Inductor), so it must equal eager exactly."""
    ctx = PassContext("cpu", dtype, "torch")
    lowering = PassPipeline([AttentionLoweringPass], ctx)
    fusion = PassPipeline([RopeKVWritePass], ctx)  # built (pattern captured) before compiling
    result = Rewritten(fn, Counter(), Counter())

    def backend(gm: fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
        lowering.run_stage("graph", gm.graph, tuple(example_inputs))
        result.before, result.graph_before = op_counts(gm.graph), str(gm.graph)
        fusion.run_stage("graph", gm.graph, tuple(example_inputs))
        result.after, result.graph_after = op_counts(gm.graph), str(gm.graph)
        result.matches = fusion.stats["rope_kv_write"].matches()
        gm.recompile()
        return gm.forward

    torch._dynamo.reset()
    result.fn = torch.compile(fn, backend=backend, fullgraph=True)
    return result


def run(fn: Callable[..., Any], model: nn.Module, dtype: torch.dtype, lens: tuple[int, ...]):
    ctx = forward_context(model.config, dtype, lens)
    ids = torch.randint(0, 97, (sum(lens) + 1,), generator=torch.Generator().manual_seed(1))
    positions = torch.cat([torch.arange(n) for n in lens] + [torch.zeros(1, dtype=torch.int64)])
    with set_forward_context(ctx), torch.no_grad():
        hidden = fn(*dynamic(ids, positions))
    return hidden[: sum(lens)], ctx.kv_caches  # the padding row's attention is never written


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_rewrites_model_graphs(kind: str, dtype: torch.dtype) -> None:
    model = tiny_model(kind, dtype)
    r = rewrite(model.forward, dtype)
    lens = (5, 11)
    hidden, caches = run(r.fn, model, dtype, lens)
    layers = model.config.num_hidden_layers
    assert r.matches == layers
    assert (r.before[KV_WRITE], r.before[FUSED], r.before["torch.cat"]) == (layers, 0, 2 * layers)
    assert (r.after[KV_WRITE], r.after[FUSED], r.after["torch.cat"]) == (0, layers, 0)
    assert r.after[ATTENTION] == layers and sum(r.after.values()) < sum(r.before.values())
    want_hidden, want_caches = run(model.forward, model, dtype, lens)
    # The torch backend's fused op is the model's own RoPE then write_kv: bit for bit.
    torch.testing.assert_close(hidden, want_hidden, rtol=0, atol=0)
    for got, want in zip(caches, want_caches):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    n_before = counters["stats"]["unique_graphs"]
    run(r.fn, model, dtype, (1, 2, 3))  # other token counts reuse the graph
    assert counters["stats"]["unique_graphs"] == n_before


def test_nothing_changes_without_backend_support(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TorchAttentionBackend, "accepts_fused_rope_kv_write", False)
    model = tiny_model("qwen3", torch.bfloat16)
    r = rewrite(model.forward, torch.bfloat16)
    run(r.fn, model, torch.bfloat16, (3, 4))
    assert r.matches == 0 and r.graph_after == r.graph_before and r.after[FUSED] == 0


def test_partial_sites_are_left_alone() -> None:
    """Each rotated tensor must feed only its write or attention, both rotated by one cos/sin;
    the third layer is a complete site."""

    def layers(q, k, v, cos, sin, cos2, sin2):
        k_rot = apply_rotary(k, cos, sin)
        a = attention(apply_rotary(q, cos, sin), k_rot, v, 0)
        b = attention(apply_rotary(q, cos2, sin2), apply_rotary(k, cos, sin), v, 1)
        c = attention(apply_rotary(q, cos2, sin2), apply_rotary(k, cos2, sin2), v, 2)
        return a, b, c, k_rot * 2  # layer 0's rotated k is used elsewhere

    r = rewrite(layers, torch.float32)
    cfg = SimpleNamespace(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=3
    )
    lens = (3, 4)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(sum(lens) + 1, h, 16, generator=gen) for h in (4, 2, 2))
    tables = [torch.randn(sum(lens) + 1, 8, generator=gen) for _ in range(4)]
    outputs = []
    for fn in (r.fn, layers):
        ctx = forward_context(cfg, torch.float32, lens)
        with set_forward_context(ctx):
            out = fn(q, k, v, *tables)
        # The padding row of attention outputs is never written.
        outputs.append(([o[: sum(lens)] for o in out], ctx.kv_caches))
    assert r.matches == 1 and r.after[FUSED] == 1 and r.after[KV_WRITE] == 2
    (got, got_caches), (want, want_caches) = outputs
    for g, w in zip([*got, *got_caches], [*want, *want_caches]):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_fused_op_through_the_forward_context() -> None:
    """The graph op: rotated q back (new, contiguous, as its fake says), rotated k and v in the
    layer's cache, q and k untouched; the fake gives the same layout for a strided q."""
    cfg = tiny_model("llama", torch.float32).config
    ctx = forward_context(cfg, torch.float32, (3, 4))
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(8, 4 + 2 + 2, 16, generator=gen)
    q, k, v = qkv.split([4, 2, 2], dim=1)  # strided views, as after gemm_merge's split
    cos, sin = torch.randn(8, 16, generator=gen).chunk(2, dim=-1)
    q0, k0 = q.clone(), k.clone()
    with set_forward_context(ctx):
        q_rot, dep = OPS.rope_kv_write(q, k, v, cos, sin, 1)
    ref = forward_context(cfg, torch.float32, (3, 4))
    with set_forward_context(ref):
        OPS.kv_write(apply_rotary(k, cos, sin), v, 1)
    assert torch.equal(q_rot, apply_rotary(q, cos, sin)) and q_rot.is_contiguous()
    assert torch.equal(ctx.kv_caches[1], ref.kv_caches[1]) and not ctx.kv_caches[0].any()
    assert torch.equal(q, q0) and torch.equal(k, k0) and dep.numel() == 0
    with FakeTensorMode() as mode:
        fq, fk, fv, fc, fs = (mode.from_tensor(t) for t in (q, k, v, cos, sin))
        fake_q, fake_dep = OPS.rope_kv_write(fq, fk, fv, fc, fs, 1)
    assert fake_q.shape == q_rot.shape and fake_q.stride() == q_rot.stride()


def test_options_name_backend_support() -> None:
    ctx = PassContext("cpu", torch.bfloat16, "torch")
    assert RopeKVWritePass(ctx).options() == {
        "device": "cpu",
        "dtype": "torch.bfloat16",
        "backend": "torch",
        "accepts_fused_rope_kv_write": True,
    }


# --- the engine ----------------------------------------------------------------------------------
def split_pieces(compiled: Any) -> list[list[str]]:
    """The ops of each eager (splitting) piece of the compiled model's split graph."""
    pieces = []
    for _, sub in compiled.backend.split_gm.named_children():
        if isinstance(sub, fx.GraphModule):
            pieces.append([str(n.target) for n in sub.graph.nodes if n.op == "call_function"])
    return pieces


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_engine_greedy_equals_eager(kind: str, tiny_models) -> None:
    path = str(tiny_models(kind))
    eager = LLM(path, max_model_len=256, enforce_eager=True)
    with no_compile_caches():  # a warm start would skip Dynamo and the graph passes
        llm = LLM(path, max_model_len=256, compilation_level=1, passes=["+rope_kv_write"])
    compiled = llm.engine.core.runner.compiled
    assert compiled is not None
    assert compiled.pipeline.stats["rope_kv_write"].matches() == 2
    assert compiled.stats.num_pieces == 3 and compiled.stats.num_unique == 3
    getitem = "<built-in function getitem>"
    assert split_pieces(compiled) == [[FUSED, getitem, getitem, ATTENTION]] * 2
    assert token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == token_ids(
        eager.generate(PROMPTS, GREEDY, use_tqdm=False)
    )
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in (1, 2, 3, 8):
            llm.generate([f"p{i} " * (1 + i % 5) for i in range(n)], GREEDY, use_tqdm=False)
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.slow
def test_engine_with_every_pass_qwen3(tiny_models) -> None:
    """Graph-stage passes run first: with rope_kv_write on, RoPE is gone before the post-grad
    RoPE fusions look, and Qwen3's q/k norms stay in the compiled pieces."""
    path = str(tiny_models("qwen3"))
    eager = LLM(path, max_model_len=256, enforce_eager=True)
    with no_compile_caches():
        llm = LLM(
            path,
            max_model_len=256,
            compilation_level=1,
            passes=[f"+{n}" for n in builtin_names()],
        )
    compiled = llm.engine.core.runner.compiled
    matches = {n: s.matches(compiled.stats.instances) for n, s in compiled.pipeline.stats.items()}
    assert matches["rope_kv_write"] == 2 and matches["qk_norm_rope"] == matches["rope"] == 0
    # Qwen3's 4 q/k norms, no longer taken by qk_norm_rope, become lone `rms_norm`s: 5 + 4.
    assert matches["gemm_merge"] == 4 and matches["fuse_add_rmsnorm"] == 9
    assert token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == token_ids(
        eager.generate(PROMPTS, GREEDY, use_tqdm=False)
    )


# --- CUDA ----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "flashinfer"])
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_o2_with_fusion_equals_o0_gpu(kind: str, backend: str, gpu_models) -> None:
    """The backend's fused kernel inside piecewise and full CUDA graphs: greedy tokens as eager
    (-O0, same backend) by the GPU tests' greedy-close oracle."""
    from tests.conftest import assert_greedy_close, backend_available, tokens
    from tests.engine.test_gpu_engine import GREEDY as GPU_GREEDY
    from tests.engine.test_gpu_engine import PROMPTS as GPU_PROMPTS

    if not backend_available(backend):
        pytest.skip(f"{backend} not installed")
    path = str(gpu_models[kind])
    eager = LLM(path, dtype="float16", attention_backend=backend, enforce_eager=True)
    expected = tokens(eager.generate(GPU_PROMPTS, GPU_GREEDY, use_tqdm=False))
    del eager
    torch.cuda.empty_cache()
    with no_compile_caches():
        llm = LLM(
            path,
            dtype="float16",
            attention_backend=backend,
            compilation_level=2,
            max_num_seqs=16,
            cudagraph_capture_sizes=[1, 2, 4, 8, 16, 32, 64, 128, 256],
            passes=["+rope_kv_write"],
        )
    runner = llm.engine.core.runner
    fused = str(backend_ops(backend).rope_kv_write)
    assert runner.compiled.pipeline.stats["rope_kv_write"].matches() == 2
    assert sum(p.count(fused) for p in split_pieces(runner.compiled)) == 2
    assert_greedy_close(expected, tokens(llm.generate(GPU_PROMPTS, GPU_GREEDY, use_tqdm=False)))
    assert runner.graphs.full_replays > 0 and runner.graphs.piecewise_replays > 0
