"""OpenAI-compatible request bodies (pydantic), with vLLM's extra sampling fields, and their
mapping onto SamplingParams.

Every field that reaches the engine core is checked here, at the edge, before any work is done:
types are strict (no `true` for 1, no 4.0 for 4), integers fit a signed 64-bit value, floats are
finite, text is valid Unicode (no lone surrogates). Semantic ranges (temperature >= 0, top_p in
(0, 1], ...) come from `SamplingParams`, whose ValueError names the field, and token ids are
checked against the vocabulary by the InputProcessor. Unknown fields are ignored.

Responses are built as plain dicts in serving.py; their shapes follow the OpenAI API.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from compiled_llm.engine.processor import check_unicode
from compiled_llm.sampling_params import (
    INT64_MAX,
    INT64_MIN,
    BeamSearchParams,
    SamplingParams,
    StructuredOutputsParams,
)

logger = logging.getLogger(__name__)
MAX_LOGPROBS = 20


def _valid_unicode(text: str) -> str:
    check_unicode("text", text)  # pydantic's error names the field
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
Count = Annotated[int, Field(ge=0, le=INT64_MAX)]
TokenId = Annotated[int, Field(ge=0, le=INT64_MAX)]  # the vocabulary is checked downstream
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class _Strict(BaseModel):
    """Known fields are validated strictly; unknown ones are ignored, as vLLM does (SDKs and
    agent frameworks send fields of their own), and logged once per field name."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _drop_unknown(self) -> Self:
        extra = self.model_extra
        if extra:
            for name in extra:
                _log_ignored(type(self).__name__, name)
            extra.clear()
        return self


@functools.cache
def _log_ignored(model: str, field: str) -> None:
    logger.warning("ignoring the unknown request field %r (%s); logged once", field, model)


class StreamOptions(_Strict):
    include_usage: bool = False


class StructuredOutputsRequest(_Strict):
    """vLLM's `structured_outputs` request field: exactly one constraint."""

    json_: dict[str, Any] | Text | None = Field(None, alias="json")
    regex: Text | None = None
    choice: list[Text] | None = None
    grammar: Text | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False


class JSONSchemaFormat(_Strict):
    name: Text | None = None
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """OpenAI's `response_format`: text (unconstrained), json_object or json_schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


def _or_default(value: Any, defaults: Mapping[str, Any], name: str, fallback: Any) -> Any:
    """A request's value, or where it has none the model's recommended one (`defaults`,
    ModelConfig.sampling_defaults), else the library's `fallback`."""
    return defaults.get(name, fallback) if value is None else value


class _SamplingFields(_Strict):
    """Fields shared by completions and chat; names and defaults as in the OpenAI API / vLLM."""

    model: Text | None = None
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: Text | list[Text] | None = None
    seed: Int64 | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    logit_bias: dict[Text, float] | None = None  # token id (as a string) -> bias
    # vLLM's extensions
    allowed_token_ids: list[TokenId] | None = None
    bad_words: Annotated[list[Text], Field(max_length=1024)] | None = None  # vLLM's
    # the prompt tokens' logprobs: each completions choice's / the chat response's
    # `prompt_logprobs`
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    top_k: Int64 | None = None
    min_p: float | None = None
    repetition_penalty: float | None = Field(None, gt=0.0)
    min_tokens: Count = 0
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: Annotated[int, Field(ge=-1, le=INT64_MAX)] | None = None
    priority: Int64 = 0
    # vLLM's beam search: the n best of beam width n (LLM.beam_search) instead of n samples
    use_beam_search: bool = False
    length_penalty: float = 1.0  # with use_beam_search
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    # vLLM's earlier names of structured_outputs' constraints (deprecated there, still sent by
    # clients written for it): accepted, so that such a request is constrained rather than
    # answered unconstrained with the fields ignored as unknown.
    guided_json: dict[str, Any] | Text | None = None
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = None
    guided_grammar: Text | None = None

    def _guided(self) -> tuple[StructuredOutputsParams, str] | None:
        given: dict[str, Any] = {
            name: value
            for name, value in (
                ("json", self.guided_json),
                ("regex", self.guided_regex),
                ("choice", self.guided_choice),
                ("grammar", self.guided_grammar),
            )
            if value is not None
        }
        if not given:
            return None
        rf = self.response_format
        if self.structured_outputs is not None or (rf is not None and rf.type != "text"):
            field = f"guided_{next(iter(given))}"
            raise RequestError(
                "give one of response_format, structured_outputs and the guided_* fields", field
            )
        try:
            params = StructuredOutputsParams(**given)
        except ValueError as e:
            raise RequestError(str(e), f"guided_{next(iter(given))}") from None
        return params, f"guided_{params.kind}"

    def structured(self) -> tuple[StructuredOutputsParams, str] | None:
        """The request's output constraint and the field it came from (for error messages)."""
        guided = self._guided()
        if guided is not None:
            return guided
        rf = self.response_format
        if rf is not None and rf.type != "text" and self.structured_outputs is not None:
            raise RequestError(
                "give one of response_format and structured_outputs, not both",
                "structured_outputs",
            )
        if rf is not None and rf.type == "json_object":
            return StructuredOutputsParams(json_object=True), "response_format"
        if rf is not None and rf.type == "json_schema":
            field = "response_format.json_schema.schema"
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise RequestError(f"{field} is required for type json_schema", field)
            return StructuredOutputsParams(json=rf.json_schema.schema_), field
        so = self.structured_outputs
        if so is None:
            return None
        try:
            params = StructuredOutputsParams(**so.model_dump(by_alias=True))
        except ValueError as e:
            raise RequestError(str(e), "structured_outputs") from None
        return params, f"structured_outputs.{params.kind}"

    def _sampling_params(
        self,
        defaults: Mapping[str, Any],
        max_tokens: int | None,
        logprobs: int | None,
        constraint: StructuredOutputsParams | None = None,
    ) -> SamplingParams:
        """`defaults`: the model's recommended values (ModelConfig.sampling_defaults) for the
        fields the request leaves unset."""
        structured = self.structured()
        return SamplingParams(
            structured_outputs=constraint or (structured[0] if structured else None),
            n=self.n,
            temperature=_or_default(self.temperature, defaults, "temperature", 1.0),
            top_p=_or_default(self.top_p, defaults, "top_p", 1.0),
            top_k=_or_default(self.top_k, defaults, "top_k", 0),
            min_p=_or_default(self.min_p, defaults, "min_p", 0.0),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=_or_default(
                self.repetition_penalty, defaults, "repetition_penalty", 1.0
            ),
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            truncate_prompt_tokens=self.truncate_prompt_tokens,
            logit_bias=self._logit_bias(),
            allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words,
            prompt_logprobs=self.prompt_logprobs,
        )

    def _beam_search_params(
        self,
        defaults: Mapping[str, Any],
        max_tokens: int | None,
        max_model_len: int,
        refused: dict[str, bool],
    ) -> BeamSearchParams:
        """vLLM's rule: n is the beam width; temperature, ignore_eos and max_tokens (None: up
        to max_model_len) apply, the other sampling fields do not. Fields that would shape the
        answer (a stream, logprobs, a constraint, and the endpoint's own `refused`) are refused
        rather than ignored."""
        structured = self.structured()
        refused = {
            "stream": self.stream,
            "prompt_logprobs": self.prompt_logprobs is not None,
            # named by the field the constraint came from
            **({structured[1]: True} if structured is not None else {}),
            **refused,
        }
        for name, used in refused.items():
            if used:
                raise RequestError(f"{name} is not supported with use_beam_search", name)
        try:
            return BeamSearchParams(
                beam_width=self.n,
                max_tokens=max_tokens or max_model_len,
                ignore_eos=self.ignore_eos,
                temperature=_or_default(self.temperature, defaults, "temperature", 1.0),
                length_penalty=self.length_penalty,
            )
        except ValueError as e:  # its messages start with the field's name
            raise RequestError(str(e), str(e).split(" ", 1)[0]) from e

    def _logit_bias(self) -> dict[int, float] | None:
        """OpenAI's logit_bias: token ids as strings, biases clamped to [-100, 100] (as vLLM)."""
        if not self.logit_bias:
            return None
        bias = {}
        for key, value in self.logit_bias.items():
            if not key.isascii() or not key.isdigit() or len(key) > 19:
                raise RequestError(
                    f"logit_bias keys must be token ids, got {key!r:.40}", "logit_bias"
                )
            if not math.isfinite(value):
                raise RequestError("logit_bias values must be finite numbers", "logit_bias")
            bias[int(key)] = min(100.0, max(-100.0, value))
        return bias

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    # A string, a list of strings, a list of token ids, or a list of token-id lists (vLLM).
    prompt: Text | TokenIds | Annotated[list[Text], Field(min_length=1)] | list[TokenIds]
    max_tokens: Count | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False  # the prompt before the completion (with logprobs: the prompt's too)
    best_of: Count | None = None
    suffix: Text | None = None

    def beam_search_params(
        self, max_model_len: int, defaults: Mapping[str, Any]
    ) -> BeamSearchParams:
        refused = {
            "echo": self.echo,
            "logprobs": self.logprobs is not None,
            "suffix": self.suffix is not None,
            "best_of": self.best_of not in (None, self.n),
        }
        return self._beam_search_params(defaults, self.max_tokens, max_model_len, refused)

    def prompts(self) -> list[str | dict[str, Any]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise RequestError("prompt must not be empty", "prompt")
        if all(isinstance(t, int) for t in p):
            return [{"prompt_token_ids": p}]
        return [x if isinstance(x, str) else {"prompt_token_ids": x} for x in p]

    def to_sampling_params(self, defaults: Mapping[str, Any]) -> SamplingParams:
        if self.suffix is not None:
            raise RequestError("suffix is not supported", "suffix")
        if self.best_of not in (None, self.n):
            raise RequestError("best_of is not supported", "best_of")
        params = self._sampling_params(defaults, self.max_tokens, self.logprobs)
        if self.echo and self.logprobs is not None:  # echo's logprobs cover the prompt
            return params.clone(prompt_logprobs=max(self.prompt_logprobs or 0, self.logprobs))
        return params


class FunctionDefinition(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: Text


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    # Clients echo back fields such as `refusal`; they are kept but never reach the template.
    model_config = ConfigDict(extra="allow", strict=True)

    role: Text
    content: Text | list[TextPart] | None = None
    # An assistant turn that called tools, and a tool's result (the OpenAI shapes)
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: Text | None = None
    name: Text | None = None

    def to_template(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.tool_calls:
            message["tool_calls"] = [_template_call(c) for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    """A tool call as chat templates expect it: arguments as a mapping where they parse (the
    OpenAI API carries them as JSON text)."""
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        with contextlib.suppress(ValueError):
            function["arguments"] = json.loads(arguments)
    return {**call, "function": function}


Messages = Annotated[list[ChatMessage], Field(min_length=1)]


class ChatTemplateFields(_Strict):
    """How messages become a prompt: shared by chat completions and /tokenize."""

    messages: Messages
    add_generation_prompt: bool = True
    chat_template: Text | None = None  # needs --trust-request-chat-template
    chat_template_kwargs: dict[str, Any] | None = None


class ChatCompletionRequest(_SamplingFields, ChatTemplateFields):
    max_tokens: Count | None = Field(None, ge=1)  # deprecated by OpenAI, still accepted
    max_completion_tokens: Count | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # false: at most one call (server/tools.py)
    echo: bool = False  # vLLM's: the reply continues the last message, whose content it repeats

    def echo_text(self) -> str:
        """What `echo` puts before each reply (vLLM's rule): the last message's content where
        the reply continues it, i.e. where its role is the reply's (the reply is the last
        message's role's when no generation prompt is added, else the assistant's)."""
        last = self.messages[-1]
        if not self.echo or (self.add_generation_prompt and last.role != "assistant"):
            return ""
        return str(last.to_template()["content"])

    def beam_search_params(
        self, max_model_len: int, defaults: Mapping[str, Any]
    ) -> BeamSearchParams:
        """A required or named tool choice (a grammar) is refused by the caller."""
        refused = {"echo": self.echo, "logprobs": self.logprobs}
        max_tokens = self.max_completion_tokens or self.max_tokens
        return self._beam_search_params(defaults, max_tokens, max_model_len, refused)

    def to_sampling_params(
        self, defaults: Mapping[str, Any], constraint: StructuredOutputsParams | None = None
    ) -> SamplingParams:
        """`constraint`: the grammar of a required or named tool choice. Without max tokens the
        reply may run to the end of the context (the caller caps it at the model's recommended
        `max_tokens`, knowing the prompt's length)."""
        if self.top_logprobs and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs=true", "top_logprobs")
        max_tokens = self.max_completion_tokens or self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(defaults, max_tokens, logprobs, constraint)


class TokenizeRequest(ChatTemplateFields):
    """vLLM's /tokenize: a `prompt`, or chat `messages` rendered with the chat template."""

    model: Text | None = None
    prompt: Text | None = None
    messages: Messages | None = None  # type: ignore[assignment]
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Strict):
    model: Text | None = None
    tokens: list[TokenId]


class RequestError(ValueError):
    """Bad request content found after parsing; `param` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def param_of(error: ValueError, default: str | None = None) -> str | None:
    """The field a validation message is about: SamplingParams and InputProcessor messages
    start with the field's name."""
    param = getattr(error, "param", None)  # RequestError, StructuredOutputsError
    if param is not None:
        return str(param)
    first = str(error).split(" ", 1)[0].split("=", 1)[0]
    if first in ("prompt", "prompt_token_ids"):
        return "prompt"
    return first if first in SamplingParams.__dataclass_fields__ else default


class APIError(Exception):
    """Becomes an OpenAI-style error response: {"error": {message, type, param, code}}."""

    TYPES = {
        400: "BadRequestError",
        401: "AuthenticationError",
        404: "NotFoundError",
        405: "MethodNotAllowedError",
        409: "ConflictError",
        413: "RequestTooLargeError",
        500: "InternalServerError",
        503: "ServiceUnavailableError",
    }

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        kind = self.TYPES.get(self.status, "Error")
        return {
            "error": {
                "message": self.message,
                "type": kind,
                "param": self.param,
                "code": self.status,
            }
        }
