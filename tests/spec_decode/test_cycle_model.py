"""The cycle model the speculation tests draft against (tests/spec_decode/conftest.py) follows its
permutation most of the time in every shape they build, checked with HF transformers on CPU: the
GPU tests' claim that drafts are accepted rests on it, and a shape whose layers outweigh the
embedding (as 0.15 did at the GPU width) would leave them with nothing accepted."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from tests.conftest import GPU_SHAPE
from tests.spec_decode.conftest import GPU_LAYER_SCALE, VOCAB, build_cycle_model, chain, permutation

_rng = random.Random(0)
PROMPTS = [
    chain(17, 40) + [17],
    chain(5, 24) + [_rng.randrange(VOCAB) for _ in range(9)] + [5],
    [_rng.randrange(VOCAB) for _ in range(20)],
]


@pytest.mark.parametrize(
    "shape",
    [
        {},
        {"layer_scale": GPU_LAYER_SCALE, **GPU_SHAPE},
        {"layer_scale": GPU_LAYER_SCALE, **GPU_SHAPE, "num_hidden_layers": 1},
    ],
    ids=["64-wide", "256-wide", "256-wide-1-layer"],
)
def test_cycle_model_follows_f(tmp_path: Path, embedded_tokenizer_dir: Path, shape: dict) -> None:
    import transformers

    build_cycle_model(tmp_path, embedded_tokenizer_dir, **shape)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    f = permutation()
    hits = total = 0
    for prompt in PROMPTS:
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=48, do_sample=False, pad_token_id=0
        )[0].tolist()
        text = out[len(prompt) - 1 :]  # the last prompt token, then the generated ones
        hits += sum(f[a] == b for a, b in zip(text, text[1:]))
        total += len(text) - 1
    assert hits / total >= 0.9
    assert hits < total or shape.get("num_hidden_layers") == 1  # the layers still matter
