"""The embedded GGUF is dequantized once; later loads read the converted safetensors, which hold
exactly the dequantized tensors; a conversion that another process published meanwhile is kept."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from compiled_llm.models.loader import (
    default_model_path,
    gguf_side_folder,
    gguf_weights,
    iterate_gguf,
    load_hf_config,
)

NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.29.mlp.down_proj.weight",
    "model.norm.weight",
]


@pytest.mark.slow
def test_gguf_weights_are_converted_once() -> None:
    path = default_model_path()
    config = load_hf_config(path)
    expected = dict(iterate_gguf(path, config, NAMES))
    assert set(expected) == set(NAMES)
    folder = os.path.join(gguf_side_folder(path), "weights")
    before = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    first = dict(gguf_weights(path, config, NAMES))
    (created,) = set(os.listdir(folder)) - before
    file = os.path.join(folder, created, "model.safetensors")
    stamp = os.stat(file).st_mtime_ns
    second = dict(gguf_weights(path, config, NAMES))
    assert os.stat(file).st_mtime_ns == stamp  # read, not written again
    for name, tensor in expected.items():
        assert first[name].dtype == second[name].dtype == torch.float32
        assert torch.equal(first[name], tensor) and torch.equal(second[name], tensor), name


def test_conversion_keeps_an_entry_another_process_published_meanwhile(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes convert the same GGUF tensors at once (two servers starting): the one that
    finishes second keeps the first's published file, which a reader may already have open,
    instead of deleting it to put its own copy there."""
    from safetensors.torch import save_file

    from compiled_llm.models import loader

    side = tmp_path / "side"
    converted = side / "weights" / hashlib.sha256(b"w").hexdigest()[:12]
    theirs = {"w": torch.zeros(2)}

    def convert_while_another_publishes(path, hf_config, names):
        other = tmp_path / "other.tmp"
        other.mkdir()
        save_file(theirs, str(other / "model.safetensors"))
        loader.publish(str(other), str(converted))
        yield "w", torch.ones(2)

    monkeypatch.setattr(loader, "gguf_side_folder", lambda path: str(side))
    monkeypatch.setattr(loader, "iterate_gguf", convert_while_another_publishes)
    got = dict(loader.gguf_weights("unused.gguf", None, ["w"]))
    assert torch.equal(got["w"], theirs["w"])  # the first published entry, still in place
    assert sorted(p.name for p in converted.parent.iterdir()) == [converted.name]  # ours dropped


def test_side_folder_keeps_an_entry_another_process_published_meanwhile(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for the config and tokenizer converted from a GGUF's metadata."""
    import transformers

    from compiled_llm import envs
    from compiled_llm.models import loader

    class Converted:
        def save_pretrained(self, tmp: str) -> None:
            final = tmp.removesuffix(f".tmp{os.getpid()}")
            if not os.path.exists(final):  # another process finishes its conversion first
                os.makedirs(f"{final}.other")
                for name in ("theirs", "complete"):
                    open(os.path.join(f"{final}.other", name), "w").close()
                loader.publish(f"{final}.other", final)
            os.makedirs(tmp, exist_ok=True)
            open(os.path.join(tmp, "ours"), "w").close()

    class Auto:
        @staticmethod
        def from_pretrained(src: str, gguf_file: str) -> Converted:
            return Converted()

    monkeypatch.setattr(transformers, "AutoConfig", Auto)
    monkeypatch.setattr(transformers, "AutoTokenizer", Auto)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with envs.override(cache_dir=str(tmp_path / "cache")):
        folder = loader.gguf_side_folder(str(gguf))
    assert sorted(os.listdir(folder)) == ["complete", "theirs"]
    assert os.listdir(os.path.dirname(folder)) == [os.path.basename(folder)]  # ours dropped
