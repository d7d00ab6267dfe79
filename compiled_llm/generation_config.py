"""A model's recommended sampling defaults, as vLLM reads them (`generation_config`).

Model creators put recommended sampling settings in `generation_config.json` (Llama-3.1-Instruct:
temperature 0.6, top_p 0.9). With `generation_config="auto"` (vLLM's default) those become the
defaults of requests that leave them unset: `LLM.get_default_sampling_params()` (what `generate`
and `chat` use without sampling params) and the server's unset request fields. "vllm" ignores
the file (the library's own defaults); a folder reads its `generation_config.json` instead.
`override_generation_config` then replaces single values.

Read as vLLM reads them: only these six fields, and only values that differ from transformers'
`GenerationConfig` defaults (vLLM takes `to_diff_dict()`): a file's `top_k: 50` is that default
and recommends nothing. The file is read as JSON: a warm start imports no transformers.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)

# The fields read, with transformers' GenerationConfig defaults (which recommend nothing).
FIELDS: dict[str, Any] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 50,
    "min_p": None,
    "repetition_penalty": 1.0,
    "max_new_tokens": None,
}
SOURCES = ("auto", "vllm")  # or a folder with a generation_config.json


def check_source(source: str, overrides: Mapping[str, Any] | None) -> None:
    """ValueError naming the field for a source that is neither a known name nor a folder with a
    generation_config.json, and for override keys outside FIELDS."""
    if source not in SOURCES and not os.path.isfile(_file(source)):
        raise ValueError(
            f"generation_config must be one of {SOURCES} or a folder with a "
            f"generation_config.json, got {source!r}"
        )
    unknown = sorted(set(overrides or {}) - set(FIELDS))
    if unknown:
        raise ValueError(
            f"override_generation_config has unknown key(s) {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(FIELDS)}"
        )
    _check_values(_as_sampling(dict(overrides or {})), "override_generation_config")


def sampling_defaults(
    model: str, source: str, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """SamplingParams field -> default: the recommended values of `source` ("auto": the model
    folder's file; nothing for a .gguf file or a folder without one), then `overrides`.
    `max_new_tokens` is SamplingParams' `max_tokens`."""
    found: dict[str, Any] = {}
    path = None if source == "vllm" else _file(model if source == "auto" else source)
    if path is not None and os.path.isfile(path):
        with open(path) as f:
            data = json.load(f)
        found = {k: data[k] for k in FIELDS if data.get(k) is not None and data[k] != FIELDS[k]}
    if found:  # vLLM says so too: outputs differ from the library's defaults
        logger.info("default sampling values from %s: %s", path, found)
    found.update(overrides or {})
    defaults = _as_sampling(found)
    _check_values(defaults, path or "override_generation_config")
    return defaults


def _as_sampling(values: dict[str, Any]) -> dict[str, Any]:
    if "max_new_tokens" in values:
        values["max_tokens"] = values.pop("max_new_tokens")
    return values


def _check_values(defaults: dict[str, Any], where: str) -> None:
    """ValueError naming `where` and the field for a value SamplingParams refuses."""
    from compiled_llm.sampling_params import SamplingParams

    try:
        SamplingParams(**defaults)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None


def _file(folder: str) -> str:
    return os.path.join(folder, "generation_config.json")
