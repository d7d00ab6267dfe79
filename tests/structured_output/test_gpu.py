"""On CUDA: the bitmask applied on the device equals xgrammar's reference, and constrained
generation at -O2 (CUDA graphs, async scheduling) holds its constraints on every sample while
unconstrained neighbours are unchanged."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from compiled_llm import LLM, SamplingParams
from compiled_llm.sampling.sampler import apply_token_bitmask
from compiled_llm.sampling_params import StructuredOutputsParams as SO
from compiled_llm.structured_output.manager import bitmask_width

pytestmark = pytest.mark.gpu


def test_device_mask_equals_xgrammar() -> None:
    """The sampler's mask on the device (rows 1, 2, 8 and 10 without a grammar: all ones)
    against xgrammar's plain-torch kernel on the CPU, bfloat16 and float32 logits at a Llama 3
    vocabulary."""
    import xgrammar as xgr

    vocab = 128256
    g = torch.Generator().manual_seed(0)
    mask = torch.randint(-(2**31), 2**31 - 1, (12, bitmask_width(vocab)), generator=g).int()
    free = [1, 2, 8, 10]
    mask[free] = -1
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(12, vocab, generator=g).to(dtype)
        ours = apply_token_bitmask(logits.cuda(), mask.cuda()).cpu()
        reference = logits.clone()
        xgr.apply_token_bitmask_inplace(reference, mask, backend="torch_native")
        assert torch.equal(ours, reference)
        assert torch.equal(ours[free], logits[free])


SCHEMA = {
    "type": "object",
    "properties": {
        "a": {"enum": ["x", "y"]},
        "b": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["a", "b"],
}
REGEX = r"[a-z]{3,6}-[0-9]{2}"


def test_constrained_generation_with_cuda_graphs(gpu_models) -> None:
    llm = LLM(str(gpu_models["llama"]), dtype="float16", max_model_len=256)
    assert llm.engine.core.runner.graphs is not None and llm.engine.core.async_scheduling
    plain = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    alone = llm.generate(["def main():"], plain, use_tqdm=False)[0].outputs[0].token_ids
    params = [
        plain,
        SamplingParams(
            temperature=1.0, n=8, seed=1, max_tokens=48, structured_outputs=SO(regex=REGEX)
        ),
        SamplingParams(
            temperature=1.0,
            n=8,
            seed=2,
            max_tokens=16,
            structured_outputs=SO(choice=["yes", "no", "maybe so"]),
        ),
        SamplingParams(
            temperature=0.8,
            n=8,
            seed=3,
            max_tokens=64,
            logprobs=2,
            structured_outputs=SO(json=SCHEMA, disable_any_whitespace=True),
        ),
    ]
    free = llm.engine.num_free_blocks
    outs = llm.generate(["def main():", "x =", "y =", "z ="], params, use_tqdm=False)
    assert outs[0].outputs[0].token_ids == alone
    for c in outs[1].outputs:
        assert c.finish_reason == "stop" and re.fullmatch(REGEX, c.text), c.text
    for c in outs[2].outputs:
        assert c.finish_reason == "stop" and c.text in ("yes", "no", "maybe so")
    for c in outs[3].outputs:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), SCHEMA)
    assert llm.engine.num_free_blocks == free
