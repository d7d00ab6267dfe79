"""A tiny model whose greedy text repeats, so that n-gram drafts are really accepted (a random
model's text does not repeat): embeddings are orthonormal rows, the output head maps the row of
token x to token f(x) for a fixed permutation f of the 64-token vocabulary, and the layers'
outputs are scaled down (`layer_scale`: 0.15 at the default 64-wide shape, 0.035 at the GPU
tests' 256-wide one, where the same 0.15 lets the layers win). The next token is then f(current)
about 95% of the time (`test_cycle_model_follows_f`): the layers, through attention over the
whole context, change the rest and every logprob, so a wrong KV entry would show. Drafts looked
up in a prompt that is f's own chain are accepted; drafts from noise are rejected."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import make_tiny_model

VOCAB = 64
# build_cycle_model's layer_scale for the GPU tests' shape (tests.conftest.GPU_SHAPE)
GPU_LAYER_SCALE = 0.035


def permutation() -> list[int]:
    return torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0)).tolist()


def chain(start: int, n: int) -> list[int]:
    """start, f(start), f(f(start)), ... (n + 1 tokens)."""
    f = permutation()
    out = [start]
    for _ in range(n):
        out.append(f[out[-1]])
    return out


def build_cycle_model(
    path: Path, tokenizer_dir: Path, layer_scale: float = 0.15, **overrides: object
) -> Path:
    import transformers

    make_tiny_model(
        "llama", path, tokenizer_dir, vocab_size=VOCAB, tie_word_embeddings=False, **overrides
    )
    model = transformers.LlamaForCausalLM.from_pretrained(path)
    g = torch.Generator().manual_seed(1)
    rows, _ = torch.linalg.qr(torch.randn(model.config.hidden_size, VOCAB, generator=g))
    rows = rows.T  # VOCAB orthonormal rows
    inverse = torch.argsort(torch.tensor(permutation()))
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(rows * 4)
        model.lm_head.weight.copy_(rows[inverse] * 3)  # logit of f(x) ~ <h, row x>
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(layer_scale)
            layer.mlp.down_proj.weight.mul_(layer_scale)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def cycle_model(tmp_path_factory: pytest.TempPathFactory, embedded_tokenizer_dir: Path) -> Path:
    return build_cycle_model(tmp_path_factory.mktemp("cycle-llama"), embedded_tokenizer_dir)
