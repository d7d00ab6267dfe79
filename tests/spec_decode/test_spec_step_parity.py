"""Speculation does the same steps with and without async scheduling (#16: on the H200 a
verification step looked 4.5 ms dearer under async scheduling). Under async scheduling a
speculating engine reads each step's tokens before it schedules the next (the proposer needs
them), so it must launch exactly the steps the synchronous engine launches, each with the same
tokens and drafts, read every result once and force no device sync of its own. What would break
it: proposals made one step late (every other step without drafts), a step that verifies
nothing, a result read twice, an `.item()` in the step path. Counted, not timed."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from compiled_llm import LLM, SamplingParams
from compiled_llm.attention_backends.torch_ref import TorchAttentionBackend
from compiled_llm.engine import model_runner
from tests.spec_decode.conftest import chain, permutation

K = 3
PROMPTS = [{"prompt_token_ids": chain(start, 20)} for start in (5, 17, 40, 9)]
PARAMS = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
# Ops that make the host wait for the device on CUDA (a tensor read as a Python number). A
# `.tolist()` or `.cpu()` of a CPU tensor dispatches nothing, so the StepHandle's own copy and
# any other host copy are not seen here on CPU.
SYNC_OPS = {
    "aten.item.default",
    "aten._local_scalar_dense.default",
    "aten.is_nonzero.default",
    "aten.equal.default",
}


class ChainProposer:
    """The oracle: f's chain from the newest token (the cycle model follows f ~97% of the time)."""

    def __init__(self) -> None:
        self.f = permutation()

    def propose(self, requests: list[Any], max_drafts: list[int]) -> list[list[int]]:
        out = []
        for r, k in zip(requests, max_drafts):
            t, drafts = r.all_token_ids[-1], []
            for _ in range(k):
                t = self.f[t]
                drafts.append(t)
            out.append(drafts)
        return out


class _Ops(TorchDispatchMode):
    """Counts the ops dispatched, except while `paused` (the reference attention backend's
    metadata: it reads its own inputs by design, host tensors on CPU; on CUDA it is only the GPU
    tests' oracle, never the engine's backend)."""

    def __init__(self, counts: Counter[str]) -> None:
        super().__init__()
        self.counts = counts
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if not self.paused:
            self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def run(path: str, async_scheduling: bool, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    llm = LLM(
        path,
        max_model_len=256,
        enforce_eager=True,
        skip_tokenizer_init=True,
        async_scheduling=async_scheduling,
        speculative_config={"method": "ngram", "num_speculative_tokens": K, "draft_token_cost": 0},
    )
    core = llm.engine.core
    assert core.spec is not None
    core.spec.proposer = ChainProposer()
    launches: list[tuple[int, int, bool]] = []  # (tokens, drafts, a step was still in flight)
    reads: list[int] = []  # per result read: how many times that step's result was read
    ops = Counter[str]()
    launch = core.runner.launch

    def counted_launch(sched, block_ids, previous=None, planned=None):  # noqa: ANN001, ANN202
        drafts = sum(len(s.draft_token_ids) for s in sched.scheduled)
        tokens = sum(s.num_tokens for s in sched.scheduled)
        launches.append((tokens, drafts, previous is not None))
        return launch(sched, block_ids, previous, planned)

    result = model_runner.StepHandle.result

    def counted_result(self):  # noqa: ANN001, ANN202
        self.times_read = getattr(self, "times_read", 0) + 1
        reads.append(self.times_read)
        return result(self)

    mode = _Ops(ops)
    build_metadata = TorchAttentionBackend.build_metadata

    def uncounted_build_metadata(self, inputs):  # noqa: ANN001, ANN202
        mode.paused = True
        try:
            return build_metadata(self, inputs)
        finally:
            mode.paused = False

    monkeypatch.setattr(core.runner, "launch", counted_launch)
    monkeypatch.setattr(model_runner.StepHandle, "result", counted_result)
    monkeypatch.setattr(TorchAttentionBackend, "build_metadata", uncounted_build_metadata)
    step = core.step

    def counted_step():  # noqa: ANN202
        with mode:
            return step()

    monkeypatch.setattr(core, "step", counted_step)
    outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    monkeypatch.undo()
    return {
        "tokens": [o.outputs[0].token_ids for o in outs],
        "spec": [o.metrics.spec_decode for o in outs],
        "launches": launches,
        "reads": reads,
        "syncs": {op: n for op, n in ops.items() if op in SYNC_OPS},
    }


def test_async_scheduling_launches_the_synchronous_steps(cycle_model, monkeypatch) -> None:
    sync = run(str(cycle_model), False, monkeypatch)
    asyn = run(str(cycle_model), True, monkeypatch)
    assert asyn["tokens"] == sync["tokens"]
    assert asyn["spec"] == sync["spec"]
    # the same steps, with the same tokens and drafts, none scheduled behind one in flight
    assert [t[:2] for t in asyn["launches"]] == [t[:2] for t in sync["launches"]]
    assert not any(t[2] for t in asyn["launches"])
    for r in (sync, asyn):
        assert r["reads"] == [1] * len(r["launches"])  # every step's result read once
        assert r["syncs"] == {}  # nothing in the step path reads a device value
        # every step after the prefill verifies drafts (all four requests stay on f's chain)
        decode = r["launches"][1:]
        assert decode and all(drafts > 0 for _, drafts, _ in decode)
    generated = sum(len(t) for t in sync["tokens"])
    accepted = sum(m.num_accepted_draft_tokens for m in sync["spec"])
    assert accepted > 0.6 * generated  # drafts carried the decode (at most K of K + 1 tokens)
    # steps per generated token: a verification step per request emits accepted + 1 tokens
    assert len(sync["launches"]) - 1 <= -(-(generated - len(PROMPTS)) // 2)


def test_the_count_sees_a_device_read(cycle_model, monkeypatch) -> None:
    """The op counter of the test above is not blind: an `.item()` in the step shows."""
    sample = model_runner.ModelRunner.sample

    def sample_and_read(self, step, bitmask=None):  # noqa: ANN001, ANN202
        if step.logits is not None:
            step.logits[0, 0].item()
        return sample(self, step, bitmask)

    monkeypatch.setattr(model_runner.ModelRunner, "sample", sample_and_read)
    with torch.inference_mode():
        r = run(str(cycle_model), True, monkeypatch)
    assert r["syncs"].get("aten.item.default", 0) >= len(r["launches"])
