"""`SamplingParams`, with vLLM's field names and meanings so user code ports unchanged."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


_FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)


@dataclass
class StructuredOutputsParams:
    """One constraint on a request's output, enforced token by token with a grammar (vLLM's
    names): a JSON schema, a regular expression, one of several strings, an EBNF grammar, or any
    JSON object. Exactly one is set. Whether a schema, regex or grammar compiles is checked by
    the frontend (compiled_llm/structured_output/validate.py), which names the failing field."""

    json: str | dict[str, Any] | None = None  # a JSON schema, as a dict or its JSON text
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # EBNF (GBNF style), whose start rule is `root`
    json_object: bool | None = None  # any JSON object
    # JSON without free whitespace between tokens (vLLM's option): keeps small models from
    # looping on newlines
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        given = [name for name in _CONSTRAINTS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                f"structured_outputs must set exactly one of {', '.join(_CONSTRAINTS)}, got "
                f"{', '.join(given) or 'none'}"
            )
        kinds: dict[str, type | tuple[type, ...]] = {
            "json": (str, dict),
            "regex": str,
            "choice": list,
            "grammar": str,
            "json_object": bool,
        }
        for name, kind in kinds.items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise ValueError(f"structured_outputs.{name} has the wrong type: {value!r:.80}")
        if self.choice is not None and (
            not self.choice or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise ValueError("structured_outputs.choice must be a list of non-empty strings")

    @property
    def kind(self) -> str:
        """The one constraint set: json, regex, choice, grammar or json_object."""
        return next(name for name in _CONSTRAINTS if getattr(self, name) not in (None, False))


_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs per output token (plus the sampled one)
    # Logprobs of the prompt's tokens (vLLM's prompt_logprobs): the top k at each position plus
    # the prompt token itself; RequestOutput.prompt_logprobs, None at the first token.
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | None = None
    # Added to the logits of these token ids before sampling (OpenAI's logit_bias, as in vLLM:
    # after the raw logprobs, before penalties and temperature).
    logit_bias: dict[int, float] | None = None
    # Only these token ids may be sampled (vLLM's allowed_token_ids).
    allowed_token_ids: list[int] | None = None
    # Keep only the last k prompt tokens (vLLM's truncate_prompt_tokens; -1: max_model_len - 1,
    # the longest prompt that leaves room for one token).
    truncate_prompt_tokens: int | None = None
    # Words that may not be generated (vLLM's bad_words): the last token of a word's tokens is
    # banned whenever the output so far ends with the rest (a one-token word: always).
    bad_words: list[str] | None = None
    # False: token ids only, no text (vLLM's detokenize): CompletionOutput.text stays "" and
    # logprobs' decoded_token None; stop strings, which are matched in the text, need it.
    detokenize: bool = True
    # Filled by the engine: EOS and generation-config stop ids; bad_words as token ids (each
    # word with and without a leading space, as vLLM tokenizes them).
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)
    bad_words_token_ids: list[list[int]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")

        def integer(name: str, low: int, optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            if not _is_int(value) or not low <= value <= INT64_MAX:
                bound = "-2**63" if low == INT64_MIN else str(low)
                fail(name, f"must be an integer in [{bound}, 2**63)")

        for name in _FLOAT_FIELDS:
            if not _is_real(getattr(self, name)):
                fail(name, "must be a finite number")
        integer("n", 1)
        integer("top_k", 0)
        integer("max_tokens", 1, optional=True)
        integer("min_tokens", 0)
        integer("logprobs", 0, optional=True)
        integer("prompt_logprobs", 0, optional=True)
        integer("truncate_prompt_tokens", -1, optional=True)
        if self.truncate_prompt_tokens == 0:
            fail("truncate_prompt_tokens", "must be -1 or at least 1")
        integer("seed", INT64_MIN, optional=True)
        if self.temperature < 0:
            fail("temperature", "must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            fail("top_p", "must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            fail("min_p", "must be in [0, 1]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            fail("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            fail("frequency_penalty", "must be in [-2, 2]")
        if self.repetition_penalty <= 0:
            fail("repetition_penalty", "must be > 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail("min_tokens", f"must be <= max_tokens={self.max_tokens}")
        if any(not isinstance(s, str) or not s for s in self.stop):  # type: ignore[union-attr]
            fail("stop", "must be non-empty strings")
        if any(not _is_int(t) or not 0 <= t <= INT64_MAX for t in self.stop_token_ids):  # type: ignore[union-attr]
            fail("stop_token_ids", "must be non-negative integers below 2**63")
        if self.logit_bias is not None and (
            not isinstance(self.logit_bias, dict)
            or not all(_is_int(t) and 0 <= t <= INT64_MAX for t in self.logit_bias)
            or not all(_is_real(v) for v in self.logit_bias.values())
        ):
            fail("logit_bias", "must map non-negative token ids to finite numbers")
        if self.allowed_token_ids is not None and (
            not isinstance(self.allowed_token_ids, list)
            or not self.allowed_token_ids
            or not all(_is_int(t) and 0 <= t <= INT64_MAX for t in self.allowed_token_ids)
        ):
            fail("allowed_token_ids", "must be a non-empty list of non-negative token ids")
        if self.bad_words is not None and (
            not isinstance(self.bad_words, list)
            or not all(isinstance(w, str) and w.strip() for w in self.bad_words)
        ):
            fail("bad_words", "must be a list of words (strings that are not blank)")
        if not isinstance(self.detokenize, bool):
            fail("detokenize", "must be a bool")
        if not self.detokenize and self.stop:
            fail("stop", "needs detokenize=True (stop strings are matched in the text)")
        so = self.structured_outputs
        if so is not None and not isinstance(so, StructuredOutputsParams):
            fail("structured_outputs", "must be a StructuredOutputsParams")

    def sample_seed(self, index: int) -> int | None:
        """The seed of sample `index` of `n`: seed + index, folded into [0, 2**63) (the
        sampler hashes the low 32 bits, which the fold keeps)."""
        return None if self.seed is None else (self.seed + index) % (INT64_MAX + 1)

    @property
    def has_penalties(self) -> bool:
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def clone(self, **changes: object) -> SamplingParams:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class BeamSearchParams:
    """`LLM.beam_search`'s parameters (vLLM's): keep the `beam_width` sequences of highest
    score, extending each by one token a step, for up to `max_tokens` tokens. The score is the
    cumulative logprob over (prompt + output length, without a final EOS) ** length_penalty."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False  # False: a sequence that reaches EOS is complete
    temperature: float = 0.0  # the candidates' draw (logprobs are the model's either way)
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not _is_real(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_real(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
