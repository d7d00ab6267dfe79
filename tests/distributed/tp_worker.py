"""What each spawned rank runs in tests/distributed/test_tensor_parallel.py: build its shard of
a tiny model, load its slices, run one packed batch eagerly (and compiled at -O1) and compare
with the unsharded model it also builds."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from compiled_llm.attention_backends.base import AttentionInputs
from compiled_llm.attention_backends.registry import create_backend
from compiled_llm.config import EngineArgs
from compiled_llm.distributed.parallel import TensorParallel
from compiled_llm.distributed.plan import ShardPlan
from compiled_llm.forward_context import ForwardContext, set_forward_context
from compiled_llm.models.attention import layer_attention
from compiled_llm.models.loader import load_model

Q_LENS = (5, 9, 2)  # a packed batch of three prefills
# float32 both sides; the sharded GEMMs sum in another order than the whole ones. GPU GEMMs
# pick kernels by shape, so their rounding differs more.
TOLERANCE = {"cpu": 1e-5, "cuda": 1e-4}  # rtol = atol


class Runner:
    """One model (whole or one rank's shard) with its own backend and KV cache."""

    def __init__(
        self, path: str, plan: ShardPlan | None, dump_dir: str | None, device: torch.device
    ) -> None:
        """Compiled at -O1 (dumping the pass graphs to `dump_dir`, which also keeps the compile
        caches off) where `dump_dir` is given, else eager."""
        kwargs: dict[str, Any] = dict(
            model=path, dtype="float32", max_model_len=64, device=str(device)
        )
        if dump_dir is None:
            kwargs["enforce_eager"] = True
        else:
            kwargs.update(compilation_level=1, compile_dump_dir=dump_dir)
        self.config = EngineArgs.from_kwargs(**kwargs).create_config()
        mc = self.config.model_config
        self.model = load_model(mc, device, plan)
        block_size = self.config.cache_config.block_size
        spec = mc.attention_spec(block_size, device, layer_attention(self.model, mc.num_layers))
        if plan is not None:
            heads, kv_heads = plan.local_heads
            spec = dataclasses.replace(spec, num_heads=heads, num_kv_heads=kv_heads)
        self.backend = create_backend("torch", spec)
        q_lens = np.array(Q_LENS, dtype=np.int64)
        width = -(-int(q_lens.max()) // block_size)
        table = np.arange(len(q_lens) * width, dtype=np.int32).reshape(len(q_lens), width)
        self.attn, positions = AttentionInputs.from_batch(q_lens, q_lens, table, block_size, device)
        self.kv_caches = self.backend.allocate_kv_caches(table.size, mc.num_layers)
        gen = torch.Generator().manual_seed(0)
        vocab = int(mc.hf_config.vocab_size)
        self.input_ids = torch.randint(0, vocab, (int(q_lens.sum()),), generator=gen).to(device)
        self.positions = torch.from_numpy(positions).to(device)
        self.forward = self.model.forward
        if dump_dir is not None:
            from compiled_llm.compilation.compiler import CompiledModel

            self.compiled = CompiledModel(self.model, self.config, self.backend.name)
            self.forward = self.compiled

    @torch.inference_mode()
    def run(self) -> tuple[torch.Tensor, torch.Tensor]:
        metadata = self.backend.build_metadata(self.attn)
        with set_forward_context(ForwardContext(self.backend, self.kv_caches, metadata)):
            hidden = self.forward(self.input_ids, self.positions)
        return hidden, self.model.compute_logits(hidden)


def check(
    path: str, tp: TensorParallel, dump_dir: str | None, device: torch.device
) -> dict[str, Any]:
    """The rank's hidden states and logits against the whole model's (raises if they differ);
    its parameters' and the whole model's sizes for the memory check."""
    whole = Runner(path, None, None, device)
    mc = whole.config.model_config
    plan = ShardPlan(tp, mc.num_heads, mc.num_kv_heads)
    shard = Runner(path, plan, dump_dir, device)
    hidden, logits = shard.run()
    ref_hidden, ref_logits = whole.run()
    tol = TOLERANCE[device.type]
    torch.testing.assert_close(hidden, ref_hidden, rtol=tol, atol=tol)
    torch.testing.assert_close(logits, ref_logits, rtol=tol, atol=tol)
    return {
        "shard": {n: p.numel() for n, p in shard.model.named_parameters()},
        "whole": {n: p.numel() for n, p in whole.model.named_parameters()},
        "pieces": shard.compiled.stats.num_pieces if dump_dir is not None else None,
    }


Case = tuple[str, str, tuple[int, ...]]


def main(
    rank: int, world: int, port: int, cases: list[Case], results: Any, device_type: str = "cpu"
) -> None:
    """`cases`: (model folder, compile dump folder, the ranks that run compiled: the others run
    eagerly, taking part in the same collectives), run in turn. On CUDA, rank r uses GPU r and
    NCCL; on CPU, gloo."""
    if device_type == "cuda":
        torch.cuda.set_device(rank)
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 GEMMs on both sides
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
    dist.init_process_group(
        "nccl" if device_type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
    )
    try:
        tp = TensorParallel.from_group()
        out = [
            check(path, tp, os.path.join(dump, f"rank{rank}") if rank in compiled else None, device)
            for path, dump, compiled in cases
        ]
        results.put((rank, out))
    except BaseException as e:  # reported to the test, which fails with it
        results.put((rank, repr(e)))
        raise
    finally:
        dist.destroy_process_group()
