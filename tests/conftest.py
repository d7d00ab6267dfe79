"""Shared fixtures: tiny random-weight HF models saved to disk (with a real tokenizer), and the
embedded default model's tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from compiled_llm.attention_backends.registry import get_backend_class

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    initializer_range=0.2,  # spreads the logits so greedy choices are far from ties
)


# --- parallel runs: README's test command runs `pytest -n auto` (pytest-xdist) ------------------
def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: without xdist, not an error
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """`-n auto`: one worker per CPU this process may run on (xdist's own count asks psutil for
    physical cores, which undercounts a VM's vCPUs); none where CUDA is visible, so that the
    tests run in the main process as without -n: GPU tests size the KV cache from the memory
    left on the device and capture CUDA graphs, so each needs the GPU to itself. xdist's
    PYTEST_XDIST_AUTO_NUM_WORKERS, where set, decides instead."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own hook reads it
    return 0 if torch.cuda.is_available() else _usable_cpus()


def pytest_configure(config: pytest.Config) -> None:
    """In an xdist worker, torch's intra-op threads (this process's and, through
    OMP_NUM_THREADS, the servers, engine cores and ranks it starts) share the CPUs with the
    other workers instead of each taking all of them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        threads = max(1, _usable_cpus() // workers)
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def trained_tokenizer(path: Path) -> None:
    """A small byte-level BPE trained here, for machines without the embedded model (the GPU
    machine cannot receive its 98 MB file)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [
        Path(__file__).read_text(),
        *(p.read_text() for p in sorted(Path(__file__).parent.rglob("*.py"))),
    ]
    tok.train_from_iterator(corpus, trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(path)


@pytest.fixture(scope="session")
def embedded_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded model's tokenizer, converted once and saved as tokenizer.json (or a small
    trained one where the embedded model is not installed)."""
    from compiled_llm.models.loader import default_model_path, load_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    try:
        model = default_model_path()
    except ValueError:
        trained_tokenizer(path)
        return path
    load_tokenizer(model).save_pretrained(path)
    return path


def make_tiny_model(kind: str, path: Path, tokenizer_dir: Path, **overrides: object) -> Path:
    """Save a tiny random model of family `kind` (llama | qwen2 | qwen3 | mistral | gemma2 |
    gemma3 | qwen3_moe | mixtral) with our tokenizer."""
    import transformers

    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
    }[kind]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    kwargs = dict(TINY, vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if kind in ("qwen3", "gemma2", "gemma3", "qwen3_moe"):
        kwargs["head_dim"] = 16
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**kwargs)).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, embedded_tokenizer_dir: Path):
    cache: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = make_tiny_model(
                kind, tmp_path_factory.mktemp(f"tiny-{kind}"), embedded_tokenizer_dir
            )
        return cache[kind]

    return get


# --- shared by the GPU tests ---------------------------------------------------------------------
def tokens(outputs) -> list[tuple[list[int], list[dict]]]:
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outputs]


def assert_greedy_close(expected, got) -> None:
    """Greedy sequences agree until the first position where two fp16 implementations may
    legitimately pick differently: there each side's token must be in the other's top 5 (the
    logits nearly tie), and the rest of that sequence is not compared (it follows a different
    prefix). vLLM's tests use the same oracle."""
    diverged = 0
    for (ref_ids, ref_lps), (ids, lps) in zip(expected, got):
        assert len(ids) == len(ref_ids)
        for pos, (a, b) in enumerate(zip(ref_ids, ids)):
            if a == b:
                continue
            assert a in lps[pos] and b in ref_lps[pos], (pos, a, b)
            diverged += 1
            break
    assert diverged <= max(1, len(expected) // 2), "most sequences must match exactly"


def backend_available(name: str) -> bool:
    try:
        get_backend_class(name)
    except ValueError:
        return False
    return True


# FlashInfer's kernels need head_dim >= 64.
GPU_SHAPE = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64)


@pytest.fixture(scope="session")
def gpu_models(
    tmp_path_factory: pytest.TempPathFactory, embedded_tokenizer_dir: Path
) -> dict[str, Path]:
    """Tiny Llama and Qwen3 models in shapes FlashInfer accepts, for the GPU tests."""
    return {
        kind: make_tiny_model(
            kind, tmp_path_factory.mktemp(f"gpu-{kind}"), embedded_tokenizer_dir, **GPU_SHAPE
        )
        for kind in ("llama", "qwen3")
    }


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _private_caches(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests never read or write the user's ~/.cache/compiled_llm (compile artifacts, GGUF
    conversions): each session starts cold."""
    os.environ["COMPILED_LLM_CACHE_DIR"] = str(tmp_path_factory.mktemp("compiled_llm_cache"))
