"""A model's config and tokenizer as the engine reads them, derived once with transformers and
kept in the cache, so a warm start never imports transformers (about 3 s of a 2-core start:
its import, AutoConfig's lazy modules and AutoTokenizer).

Each entry is keyed by its source's identity (a file's path, size and mtime; a folder's
top-level files' names, sizes and mtimes), the transformers and tokenizers versions and FORMAT:
a changed source or library is a different key, derived anew. Cold and warm starts read the same
entry, so they see the same objects.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from compiled_llm.envs import Envs

FORMAT = 1
# Strings a derived tokenizer must encode and decode exactly as transformers does before it is
# used instead (a tokenizer whose wrapper adds behaviour of its own fails and is not derived).
PROBES = (
    "The capital of France is",
    "  leading spaces, tabs\tand\nnew lines  ",
    "Ünïcödé 日本語 emoji 🙂 and digits 1234567890",
    "<|im_start|>user\nhi<|im_end|><s></s><unk>",
)


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return ""


def source_identity(path: str) -> list[Any]:
    """What a derived entry depends on in `path`: a file's size and mtime, or those of every
    file directly in a folder."""
    path = os.path.abspath(path)
    if os.path.isfile(path):
        stat = os.stat(path)
        return [path, stat.st_size, stat.st_mtime_ns]
    files = []
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.is_file():
            stat = entry.stat()
            files.append([entry.name, stat.st_size, stat.st_mtime_ns])
    return [path, files]


def entry_folder(kind: str, source: str) -> str:
    payload = [FORMAT, kind, _version("transformers"), _version("tokenizers")]
    payload.append(source_identity(source))
    key = hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]
    return os.path.join(Envs.read().cache_dir, "derived", f"{kind}-{key}")


def cached_entry(kind: str, source: str, write: Callable[[str], None]) -> str:
    """The entry's folder, written by `write(folder)` first when absent (atomically: a start
    that stops half-way leaves no entry)."""
    folder = entry_folder(kind, source)
    if os.path.isdir(folder):
        return folder
    tmp = f"{folder}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, folder)
    return folder


def publish(tmp: str, folder: str) -> None:
    """Move the finished cache entry `tmp` to `folder`. Another process may have published the
    same entry meanwhile (tensor-parallel ranks, two servers starting at once): its copy is as
    good, so ours is dropped, and a reader of it never sees the folder vanish."""
    try:
        os.replace(tmp, folder)
    except OSError:
        if not os.path.isdir(folder):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


# --- config -------------------------------------------------------------------------------------
class DerivedConfig:
    """A transformers config's values (its full `to_dict()`), read like the config: attributes,
    the class's attribute aliases, `to_dict()` and `to_json_string()`. Anything else the config
    class defines (a method, a property) loads the transformers config and asks it."""

    def __init__(self, record: dict[str, Any], load: Callable[[], Any]) -> None:
        object.__setattr__(self, "_values", record["values"])
        object.__setattr__(self, "_aliases", record["attribute_map"])
        object.__setattr__(self, "_class_names", frozenset(record["class_attributes"]))
        object.__setattr__(self, "_load", load)
        object.__setattr__(self, "_real", None)

    def __getattr__(self, name: str) -> Any:
        if "_values" not in self.__dict__:  # being unpickled or copied
            raise AttributeError(name)
        values = self.__dict__["_values"]
        if name in values:
            return values[name]
        alias = self.__dict__["_aliases"].get(name)
        if alias in values:
            return values[alias]
        if name in self.__dict__["_class_names"]:
            if self.__dict__["_real"] is None:
                object.__setattr__(self, "_real", self.__dict__["_load"]())
            return getattr(self.__dict__["_real"], name)
        raise AttributeError(f"{self.__dict__['_values'].get('model_type')} config has no {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a derived model config is read-only")

    def __repr__(self) -> str:
        return f"DerivedConfig {self.to_json_string()}"

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.__dict__["_values"]))

    def to_json_string(self, use_diff: bool = False) -> str:
        if use_diff:
            raise NotImplementedError("a derived config holds every value (use_diff=False)")
        return json.dumps(self.__dict__["_values"], indent=2, sort_keys=True) + "\n"


def config_record(config: Any) -> dict[str, Any]:
    """What DerivedConfig reads back, from a transformers config."""
    cls = type(config)
    return {
        "format": FORMAT,
        "values": json.loads(config.to_json_string(use_diff=False)),
        "attribute_map": dict(getattr(config, "attribute_map", {}) or {}),
        "class_attributes": sorted(n for c in cls.__mro__ for n in vars(c) if n[:1] != "_"),
    }


def derived_config(source: str, load: Callable[[], Any]) -> DerivedConfig:
    """`source`'s config, derived once from `load()` (the transformers config)."""

    def write(folder: str) -> None:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config_record(load()), f)

    folder = cached_entry("config", source, write)
    with open(os.path.join(folder, "config.json")) as f:
        return DerivedConfig(json.load(f), load)


# --- tokenizer ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineTokenizer:
    """What the engine asks of a tokenizer (encode a prompt, decode a token, the EOS id, the
    backend for streaming detokenization), from the tokenizers library alone. It answers
    exactly as the transformers tokenizer it was derived from: that tokenizer's backend, saved
    after transformers set it up, checked on PROBES when derived."""

    backend_tokenizer: Any  # tokenizers.Tokenizer
    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return str(
            self.backend_tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)
        )


def _backend(make: Callable[[], Any]) -> Any:
    """A tokenizers backend set up as transformers encodes with it by default: no truncation,
    no padding, special tokens not split."""
    backend = make()
    backend.no_truncation()
    backend.no_padding()
    backend.encode_special_tokens = False
    return backend


def agrees(light: EngineTokenizer, tokenizer: Any) -> bool:
    """`light` encodes and decodes PROBES as the transformers `tokenizer` does."""
    for text in PROBES:
        ids = list(tokenizer.encode(text))
        if light.encode(text) != ids:
            return False
        for skip in (False, True):
            if light.decode(ids, skip) != tokenizer.decode(ids, skip_special_tokens=skip):
                return False
    return True


def derivable(tokenizer: Any) -> bool:
    """Whether the transformers `tokenizer` is its tokenizers backend and nothing more on the
    paths the engine uses (no decoding clean-up, special tokens not split)."""
    return (
        getattr(tokenizer, "backend_tokenizer", None) is not None
        and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
        and not getattr(tokenizer, "split_special_tokens", False)
    )


def derived_tokenizer(source: str, load: Callable[[], Any]) -> EngineTokenizer | None:
    """`source`'s EngineTokenizer, derived once from `load()` (the transformers tokenizer), or
    None where the engine must use the transformers tokenizer itself."""
    from tokenizers import Tokenizer

    def write(folder: str) -> None:
        tokenizer = load()
        path = os.path.join(folder, "tokenizer.json")
        eos = tokenizer.eos_token_id if isinstance(tokenizer.eos_token_id, int) else None
        usable = derivable(tokenizer)
        if usable:
            _backend(lambda: Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())).save(path)
            light = EngineTokenizer(_backend(lambda: Tokenizer.from_file(path)), eos)
            usable = agrees(light, tokenizer)
        meta = {"format": FORMAT, "usable": usable, "eos_token_id": eos}
        with open(os.path.join(folder, "meta.json"), "w") as f:
            json.dump(meta, f)

    folder = cached_entry("tokenizer", source, write)
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    if not meta["usable"]:
        return None
    path = os.path.join(folder, "tokenizer.json")
    return EngineTokenizer(_backend(lambda: Tokenizer.from_file(path)), meta["eos_token_id"])


def transformers_config_of(config: Any) -> Any:
    """The transformers config behind `config`: a DerivedConfig loads it (once), anything else is
    taken to be one already (the transformers fallback builds transformers' model from it)."""
    if not isinstance(config, DerivedConfig):
        return config
    state = config.__dict__
    if state["_real"] is None:
        object.__setattr__(config, "_real", state["_load"]())
    return state["_real"]
