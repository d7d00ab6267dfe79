"""Frontend input side: validate a prompt and its SamplingParams, tokenize, fan out `n`."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Mapping
from typing import Any

from compiled_llm.config import ModelConfig
from compiled_llm.engine.messages import EngineCoreRequest
from compiled_llm.sampling_params import INT64_MAX, INT64_MIN, SamplingParams
from compiled_llm.structured_output.validate import validate_structured_outputs

PromptType = str | Mapping[str, Any]


def check_unicode(name: str, text: str) -> None:
    """ValueError naming `name` if `text` cannot be encoded (JSON allows lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} is not valid Unicode (a lone surrogate at {e.start})") from None


def stop_token_ids_of(model_config: ModelConfig, tokenizer: Any) -> set[int]:
    """EOS ids from the tokenizer, the model config and generation_config.json."""
    ids: set[int] = set()

    def add(value: Any) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))

    add(getattr(tokenizer, "eos_token_id", None))
    add(getattr(model_config.hf_config, "eos_token_id", None))
    gen_path = os.path.join(model_config.model, "generation_config.json")
    if os.path.isfile(gen_path):
        import json

        with open(gen_path) as f:
            add(json.load(f).get("eos_token_id"))
    return ids


class InputProcessor:
    def __init__(self, model_config: ModelConfig, tokenizer: Any) -> None:
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.vocab_size = int(model_config.hf_config.vocab_size)
        self.eos_ids = stop_token_ids_of(model_config, tokenizer)
        self._rng = random.Random(model_config.seed)

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer (skip_tokenizer_init is set)")
            check_unicode("prompt", prompt)
            return prompt, list(self.tokenizer.encode(prompt))
        if isinstance(prompt, Mapping) and "prompt_token_ids" in prompt:
            ids = list(prompt["prompt_token_ids"])
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ValueError("prompt_token_ids must be a list of integers")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(
                    f"prompt_token_ids contains ids outside the vocabulary [0, {self.vocab_size}): "
                    f"{bad[:5]}"
                )
            return prompt.get("prompt"), ids
        if isinstance(prompt, Mapping) and "prompt" in prompt:
            return self.tokenize(prompt["prompt"])
        raise ValueError(
            "prompt must be a string, {'prompt': str} or {'prompt_token_ids': [int, ...]}"
        )

    def _bad_words(self, params: SamplingParams) -> list[list[int]]:
        """bad_words as token ids, as vLLM makes them: each word (left-stripped) on its own,
        and after a space where that gives another first token and as many tokens."""
        if not params.bad_words:
            return []
        if self.tokenizer is None:
            raise ValueError("bad_words needs a tokenizer (skip_tokenizer_init is set)")
        out: list[list[int]] = []
        for word in params.bad_words:
            alone = self.tokenizer.encode(word.lstrip(), add_special_tokens=False)
            spaced = self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            out.append(alone)
            if alone and spaced and spaced[0] != alone[0] and len(spaced) == len(alone):
                out.append(spaced)
        return [ids for ids in out if ids and max(ids) < self.vocab_size]

    def process(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> tuple[str | None, list[int], SamplingParams, list[EngineCoreRequest]]:
        """Validate and tokenize; returns the prompt, its ids, the resolved params and one core
        request per sample (`n`)."""
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        if not INT64_MIN <= priority <= INT64_MAX:
            raise ValueError(f"priority must fit a signed 64-bit integer, got {priority}")
        text, ids = self.tokenize(prompt)
        if not ids:
            raise ValueError("prompt must not be empty")
        max_len = self.model_config.max_model_len
        keep = params.truncate_prompt_tokens
        if keep is not None:
            ids = ids[-(max_len - 1 if keep == -1 else keep) :]
        if len(ids) >= max_len:
            raise ValueError(
                f"prompt is {len(ids)} tokens long, which leaves no room to generate within "
                f"max_model_len={max_len}"
            )
        if params.max_tokens is not None and len(ids) + params.max_tokens > max_len:
            raise ValueError(
                f"max_tokens={params.max_tokens} plus the prompt's {len(ids)} tokens exceeds "
                f"max_model_len={max_len}"
            )
        for name, token_ids in (
            ("stop_token_ids", params.stop_token_ids),
            ("logit_bias", params.logit_bias),
            ("allowed_token_ids", params.allowed_token_ids),
        ):
            bad = [t for t in token_ids or () if t >= self.vocab_size]
            if bad:
                raise ValueError(
                    f"{name} contains ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}"
                )
        most = self.model_config.max_logprobs
        most = self.vocab_size if most == -1 else min(most, self.vocab_size)
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > most:
                raise ValueError(
                    f"{name}={k} exceeds the most this engine returns per token, {most} "
                    f"(max_logprobs={self.model_config.max_logprobs}, vocabulary {self.vocab_size})"
                )
        max_tokens = params.max_tokens or max_len - len(ids)
        if params.min_tokens > max_tokens:
            raise ValueError(
                f"min_tokens={params.min_tokens} exceeds the {max_tokens} tokens this prompt can "
                f"generate within max_model_len={max_len}"
            )
        if params.structured_outputs is not None:
            if self.tokenizer is None:
                raise ValueError(
                    "structured_outputs needs a tokenizer (skip_tokenizer_init is set)"
                )
            validate_structured_outputs(params.structured_outputs)
        params = params.clone(
            all_stop_token_ids=set(self.eos_ids), bad_words_token_ids=self._bad_words(params)
        )
        arrival = time.monotonic() if arrival_time is None else arrival_time
        core_requests = []
        for i in range(params.n):
            seed = params.sample_seed(i)
            if seed is None:
                seed = self._rng.getrandbits(31)
            child_id = request_id if params.n == 1 else f"{request_id}-{i}"
            core_requests.append(
                EngineCoreRequest(
                    request_id=child_id,
                    prompt_token_ids=ids,
                    # the prompt's logprobs are the request's, not a sample's: computed once
                    sampling_params=params if i == 0 else params.clone(prompt_logprobs=None),
                    max_tokens=max_tokens,
                    sampling_seed=seed,
                    arrival_time=arrival,
                    priority=priority,
                )
            )
        return text, ids, params, core_requests
