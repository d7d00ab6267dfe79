"""/v1/completions and /v1/chat/completions: a request becomes one engine request per prompt
(`n` fans out inside the engine); outputs become OpenAI-shaped JSON, or SSE chunks ending with
`data: [DONE]`. A client that disconnects has its requests aborted (KV blocks freed).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from compiled_llm.beam_search import BeamSearch, check_beam_width
from compiled_llm.engine.processor import PromptType
from compiled_llm.outputs import CompletionOutput, RequestOutput
from compiled_llm.sampling_params import BeamSearchParams, SamplingParams
from compiled_llm.server import tools
from compiled_llm.server.async_llm import AsyncLLM, EngineDeadError, EngineOverloadedError
from compiled_llm.server.chat_output import ChatOutput, ChoiceStream
from compiled_llm.server.logprobs import (
    ChoiceCursor,
    chat_logprobs,
    completion_logprobs,
    echo_logprobs,
    json_prompt_logprobs,
)
from compiled_llm.server.metrics import ServerMetrics
from compiled_llm.server.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatTemplateFields,
    CompletionRequest,
    DetokenizeRequest,
    RequestError,
    TokenizeRequest,
    param_of,
)
from compiled_llm.server.reasoning_parsers import get_reasoning_parser
from compiled_llm.server.settings import ChatSettings, RequestLimits
from compiled_llm.server.streams import RequestStream
from compiled_llm.server.tool_parsers import get_tool_parser
from compiled_llm.structured_output.validate import validate_structured_outputs

T = TypeVar("T")


class OpenAIServing:
    def __init__(
        self,
        engine: AsyncLLM,
        model_names: list[str],
        metrics: ServerMetrics | None,
        limits: RequestLimits | None = None,
        chat_settings: ChatSettings | None = None,
    ) -> None:
        self.engine = engine
        self.model_names = model_names
        self.metrics = metrics
        self.limits = limits or RequestLimits()
        chat = chat_settings or ChatSettings()
        self.tool_parser = (
            get_tool_parser(chat.tool_call_parser)
            if chat.tool_call_parser and chat.enable_auto_tool_choice
            else None
        )
        self.reasoning_parser = (
            get_reasoning_parser(chat.reasoning_parser) if chat.reasoning_parser else None
        )
        self._template_params = _chat_template_parameters(engine.tokenizer)
        self.chat_template = chat.chat_template  # the server's, instead of the tokenizer's
        # the model's recommended sampling values, for fields a request leaves unset
        self.defaults = dict(engine.config.model_config.sampling_defaults)

    def check_model(self, name: str | None) -> str:
        if name is None or name in self.model_names:
            return self.model_names[0]
        raise APIError(404, f"the model {name!r} does not exist", "model")

    # --- endpoints ------------------------------------------------------------------------------
    async def completions(self, req: CompletionRequest, raw: Request) -> Response:
        model = self.check_model(req.model)
        if req.use_beam_search:
            return await self._beam_search(req, raw, model)
        with self._admission():
            params = req.to_sampling_params(self.defaults)
            prompts: list[PromptType] = list(req.prompts())
            await self._check_structured(req)
        base_id = f"cmpl-{uuid.uuid4().hex}"
        streams = await self._start(base_id, prompts, params, req.priority)
        head = {"id": base_id, "created": int(time.time()), "model": model}
        if req.stream:
            chunks = self._completion_chunks(req, streams, head)
            return _SSEResponse(chunks, streams)
        finals = await _until_disconnected(raw, _collect(streams))
        if finals is None:
            return Response(status_code=499)
        choices = []
        for i, out in enumerate(finals):
            echo = await self._echo(req, out)
            prompt_lps = None  # the request's, the same in each of its n choices
            if req.prompt_logprobs is not None and out.prompt_logprobs is not None:
                prompt_lps = {"prompt_logprobs": json_prompt_logprobs(out.prompt_logprobs)}
            for c in out.outputs:
                body, _ = _completion_choice(req, c, echo)
                choices.append({"index": i * params.n + c.index, **body, **(prompt_lps or {})})
        body = {**head, "object": "text_completion", "choices": choices, "usage": _usage(finals)}
        return JSONResponse(body)

    async def _beam_search(self, req: CompletionRequest, raw: Request, model: str) -> Response:
        """vLLM's beam search on /v1/completions: the n best sequences of each prompt are its n
        choices, their text without the prompt and a final EOS (vLLM's server)."""
        with self._admission():
            params = req.beam_search_params(
                self.engine.config.model_config.max_model_len, self.defaults
            )
            prompts: list[PromptType] = list(req.prompts())
        base_id = f"cmpl-{uuid.uuid4().hex}"
        found = await self._search_beams(prompts, params, req.priority, raw, base_id)
        if found is None:
            return Response(status_code=499)
        beams, usage = found
        choices = [
            {
                "index": b.index,
                "text": b.text,
                "logprobs": None,
                "finish_reason": b.finish_reason,
                "stop_reason": None,
            }
            for b in beams
        ]
        head = {"id": base_id, "created": int(time.time()), "model": model}
        body = {**head, "object": "text_completion", "choices": choices, "usage": usage}
        return JSONResponse(body)

    async def _search_beams(
        self,
        prompts: list[PromptType],
        params: BeamSearchParams,
        priority: int,
        raw: Request,
        base_id: str,
    ) -> tuple[list[CompletionOutput], dict[str, int]] | None:
        """Run a beam search through the engine, each step one batch of requests (compiled_llm/
        beam_search.py): prompt p's beams, best first, as choices p * n + j (text without a
        final EOS), and the usage; None if the client left."""
        mc = self.engine.config.model_config
        with self._admission():
            check_beam_width(params.beam_width, mc.max_logprobs, "n")
            self._check_sample_limit(len(prompts), params.beam_width, "beams")
        assert self.engine.processor is not None
        eos = self.engine.processor.eos_ids
        search = BeamSearch(prompts, params, eos, mc.max_model_len)
        step = 0
        while requests := search.next_requests():
            streams = await self._start(f"{base_id}-{step}", requests, search.step_params, priority)
            finals = await _until_disconnected(raw, _collect(streams))
            if finals is None:
                return None
            search.advance(finals)
            step += 1
        # (choice index, sequence, its generated tokens); texts without a final EOS (vLLM's)
        sequences = [
            (p * params.beam_width + j, seq, seq.tokens[start:])
            for p, (result, start) in enumerate(
                zip(search.results(None), search.prompt_lengths, strict=True)
            )
            for j, seq in enumerate(result.sequences)
        ]
        shown = [ids[:-1] if ids and ids[-1] in eos else ids for _, _, ids in sequences]
        tokenizer = self.engine.tokenizer

        def texts() -> list[str]:
            return [tokenizer.decode(ids) if tokenizer else "" for ids in shown]

        beams = [
            CompletionOutput(
                index=index,
                text=text,
                token_ids=ids,
                cumulative_logprob=seq.cum_logprob,
                logprobs=None,
                finish_reason=seq.finish_reason,
            )
            for (index, seq, ids), text in zip(
                sequences, await self.engine.run_blocking(texts), strict=True
            )
        ]
        completion_tokens = sum(len(ids) for _, _, ids in sequences)
        return beams, _usage_body(sum(search.prompt_lengths), completion_tokens)

    async def _echo(
        self, req: CompletionRequest, out: RequestOutput
    ) -> tuple[str, dict[str, Any] | None] | None:
        """With `echo`: the prompt's text, and its logprobs when asked (tokenizer thread)."""
        if not req.echo:
            return None
        tokenizer, ids, k = self.engine.tokenizer, out.prompt_token_ids, req.logprobs

        def decode(token_ids: list[int]) -> str:
            return tokenizer.decode(token_ids) if tokenizer is not None else ""

        def make() -> tuple[str, dict[str, Any] | None]:
            text = out.prompt if out.prompt is not None else decode(ids)
            if k is None or out.prompt_logprobs is None:
                return text, None
            return text, echo_logprobs(ids, out.prompt_logprobs, decode(ids[:1]), k)

        return await self.engine.run_blocking(make)

    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Response:
        model = self.check_model(req.model)
        if req.use_beam_search:
            return await self._chat_beam_search(req, raw, model)
        with self._admission():
            mode = tools.resolve(req, self.tool_parser)
            params = req.to_sampling_params(
                self.defaults, mode.grammar[0] if mode.grammar else None
            )
            if mode.grammar is not None:
                await self.engine.run_blocking(validate_structured_outputs, *mode.grammar)
            else:
                await self._check_structured(req)
            prompt = await self._chat_prompt(req, tools.template_tools(req))
            recommended = self.defaults.get("max_tokens")
            if params.max_tokens is None and recommended is not None:
                # vLLM's: the model's max_new_tokens, within what the context leaves
                room = self.engine.config.model_config.max_model_len
                room -= len(prompt["prompt_token_ids"])
                params = params.clone(max_tokens=max(1, min(recommended, room)))
        output = ChatOutput(mode, self.tool_parser, self.reasoning_parser)
        base_id = f"chatcmpl-{uuid.uuid4().hex}"
        streams = await self._start(base_id, [prompt], params, req.priority)
        head = {"id": base_id, "created": int(time.time()), "model": model}
        if req.stream:
            return _SSEResponse(self._chat_chunks(req, streams[0], head, output), streams)
        finals = await _until_disconnected(raw, _collect(streams))
        if finals is None:
            return Response(status_code=499)
        k = req.top_logprobs or 0
        choices = []
        echo = req.echo_text()
        for c in finals[0].outputs:
            message, finish_reason = output.message(c)
            if echo:
                message["content"] = echo + (message["content"] or "")
            choices.append(
                {
                    "index": c.index,
                    "message": message,
                    "logprobs": chat_logprobs(c, 0, k) if req.logprobs else None,
                    "finish_reason": finish_reason,
                }
            )
        body = {**head, "object": "chat.completion", "choices": choices, "usage": _usage(finals)}
        if req.prompt_logprobs is not None and finals[0].prompt_logprobs is not None:
            body["prompt_logprobs"] = json_prompt_logprobs(finals[0].prompt_logprobs)
        return JSONResponse(body)

    async def _chat_beam_search(
        self, req: ChatCompletionRequest, raw: Request, model: str
    ) -> Response:
        """vLLM's beam search on /v1/chat/completions: the n best replies, each read as a chat
        choice is (reasoning split off, auto tool calls parsed). A required or named tool
        choice would constrain the search and is refused."""
        with self._admission():
            params = req.beam_search_params(
                self.engine.config.model_config.max_model_len, self.defaults
            )
            mode = tools.resolve(req, self.tool_parser)
            if mode.grammar is not None:
                raise RequestError(
                    "a required or named tool_choice is not supported with use_beam_search",
                    "tool_choice",
                )
            prompt = await self._chat_prompt(req, tools.template_tools(req))
        output = ChatOutput(mode, self.tool_parser, self.reasoning_parser)
        base_id = f"chatcmpl-{uuid.uuid4().hex}"
        found = await self._search_beams([prompt], params, req.priority, raw, base_id)
        if found is None:
            return Response(status_code=499)
        beams, usage = found
        choices = []
        for beam in beams:
            message, finish_reason = output.message(beam)
            choices.append(
                {
                    "index": beam.index,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            )
        head = {"id": base_id, "created": int(time.time()), "model": model}
        body = {**head, "object": "chat.completion", "choices": choices, "usage": usage}
        return JSONResponse(body)

    async def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        self.check_model(req.model)
        tokenizer = self._tokenizer()
        with self._admission():
            if req.prompt is not None:
                encode = functools.partial(
                    tokenizer.encode, add_special_tokens=req.add_special_tokens
                )
                tokens = list(await self.engine.run_blocking(encode, req.prompt))
            else:
                tokens = (await self._chat_prompt(req))["prompt_token_ids"]
        mc = self.engine.config.model_config
        return {"count": len(tokens), "max_model_len": mc.max_model_len, "tokens": tokens}

    async def detokenize(self, req: DetokenizeRequest) -> dict[str, Any]:
        self.check_model(req.model)
        tokenizer = self._tokenizer()
        vocab = int(self.engine.config.model_config.hf_config.vocab_size)
        bad = [t for t in req.tokens if t >= vocab]
        if bad:
            raise APIError(400, f"tokens outside the vocabulary [0, {vocab}): {bad[:5]}", "tokens")
        return {"prompt": await self.engine.run_blocking(tokenizer.decode, req.tokens)}

    # --- admission ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _admission(self) -> Iterator[None]:
        """Validation and admission: ValueError -> 400 naming the field, overload -> 503; both
        count as rejected requests."""
        try:
            yield
        except ValueError as e:
            if self.metrics:
                self.metrics.on_rejected()
            raise APIError(400, str(e), param_of(e)) from e
        except EngineOverloadedError as e:
            if self.metrics:
                self.metrics.on_rejected()
            raise APIError(503, str(e)) from e
        except EngineDeadError as e:
            raise APIError(503, str(e)) from e

    async def _start(
        self, base_id: str, prompts: list[PromptType], params: SamplingParams, priority: int
    ) -> list[RequestStream]:
        streams: list[RequestStream] = []
        try:
            with self._admission():
                self._check_sample_limit(len(prompts), params.n, "samples")
                for i, prompt in enumerate(prompts):
                    request_id = f"{base_id}-{i}"
                    streams.append(await self.engine.generate(prompt, params, request_id, priority))
        except BaseException:
            for stream in streams:
                stream.close()
            raise
        return streams

    def _check_sample_limit(self, num_prompts: int, n: int, kind: str) -> None:
        """--max-samples-per-request: prompts x n (samples, or beams) per request."""
        limit = self.limits.max_samples_per_request
        if num_prompts * n > limit:
            raise RequestError(
                f"n={n} {kind} of {num_prompts} prompts exceed the server's limit of {limit} "
                "per request",
                "n",
            )

    async def _check_structured(self, req: CompletionRequest | ChatCompletionRequest) -> None:
        """Compile-check the output constraint on the tokenizer thread, so that an error names
        the request field it came from (the input processor checks it again, from a cache)."""
        structured = req.structured()
        if structured is not None:
            await self.engine.run_blocking(validate_structured_outputs, *structured)

    def _tokenizer(self) -> Any:
        if self.engine.tokenizer is None:
            raise APIError(400, "this server has no tokenizer (skip_tokenizer_init)")
        return self.engine.tokenizer

    async def _chat_prompt(
        self, req: ChatTemplateFields, tools: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """The prompt's token ids, rendered with the chat template on the tokenizer thread.
        transformers renders templates in Jinja's immutable sandbox; a template given by the
        request is refused unless the server trusts request templates."""
        tokenizer = self._tokenizer()
        own = getattr(tokenizer, "chat_template", None) or self.chat_template
        if not own and req.chat_template is None:
            raise ValueError("messages: this model has no tokenizer chat template")
        variables = dict(req.chat_template_kwargs or {})
        for name in variables:
            if name in self._template_params:
                raise RequestError(
                    f"chat_template_kwargs.{name} is set by the server, not a template variable",
                    f"chat_template_kwargs.{name}",
                )
        template = variables.pop("chat_template", None) or req.chat_template
        if tools is not None:
            variables["tools"] = tools
        if template is not None and not self.limits.trust_request_chat_template:
            raise RequestError(
                "chat templates from requests are refused (the server was not started with "
                "--trust-request-chat-template)",
                "chat_template",
            )
        render = functools.partial(
            tokenizer.apply_chat_template,
            [m.to_template() for m in req.messages],
            add_generation_prompt=req.add_generation_prompt,
            chat_template=template or self.chat_template,
            tokenize=True,
            **variables,
        )
        try:
            ids = await self.engine.run_blocking(render)
        except Exception as e:  # template errors (jinja raise_exception) are the caller's
            raise ValueError(f"messages: the chat template failed: {e}") from e
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return {"prompt_token_ids": list(ids)}

    # --- streaming ------------------------------------------------------------------------------
    async def _completion_chunks(
        self, req: CompletionRequest, streams: list[RequestStream], head: dict[str, Any]
    ) -> AsyncIterator[str]:
        head = {**head, "object": "text_completion"}
        cursors: dict[int, ChoiceCursor] = {}
        finals: list[RequestOutput | None] = [None] * len(streams)
        try:
            async for i, out in _merge(streams):
                finals[i] = out
                for c in out.outputs:
                    index = i * req.n + c.index
                    cursor = cursors.setdefault(index, ChoiceCursor())
                    if cursor.advance(c) is None:
                        continue
                    # the choice's first chunk (no token sent yet) carries the echoed prompt
                    first = cursor.prev_tokens == 0
                    echo = await self._echo(req, out) if first else None
                    body, cursor.offset = _completion_choice(req, c, echo, cursor)
                    cursor.commit(c)
                    choice = {"index": index, **body}
                    if first and req.prompt_logprobs is not None and out.prompt_logprobs:
                        choice["prompt_logprobs"] = json_prompt_logprobs(out.prompt_logprobs)
                    yield _sse({**head, "choices": [choice]})
            if req.include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(finals)})
        except EngineDeadError as e:
            yield _sse(APIError(503, str(e)).body())
        yield "data: [DONE]\n\n"

    async def _chat_chunks(
        self,
        req: ChatCompletionRequest,
        stream: RequestStream,
        head: dict[str, Any],
        output: ChatOutput,
    ) -> AsyncIterator[str]:
        head = {**head, "object": "chat.completion.chunk"}
        cursors: dict[int, ChoiceCursor] = {}
        choice_streams: dict[int, ChoiceStream] = {}
        final: RequestOutput | None = None
        k = req.top_logprobs or 0
        try:
            echo = req.echo_text()
            for index in range(req.n):
                role = {"role": "assistant", "content": ""}
                choice = {"index": index, "delta": role, "logprobs": None, "finish_reason": None}
                yield _sse({**head, "choices": [choice]})
            for index in range(req.n if echo else 0):
                choice = {"index": index, "delta": {"content": echo}, "logprobs": None}
                yield _sse({**head, "choices": [{**choice, "finish_reason": None}]})
            async for out in stream:
                final = out
                for c in out.outputs:
                    cursor = cursors.setdefault(c.index, ChoiceCursor())
                    if cursor.advance(c) is None:
                        continue
                    choice_stream = choice_streams.setdefault(c.index, output.stream())
                    delta, finish_reason = choice_stream.delta(c)
                    choice = {
                        "index": c.index,
                        "delta": delta,
                        "logprobs": chat_logprobs(c, cursor.prev_tokens, k)
                        if req.logprobs
                        else None,
                        "finish_reason": finish_reason,
                    }
                    cursor.commit(c)
                    yield _sse({**head, "choices": [choice]})
            if req.include_usage:
                yield _sse({**head, "choices": [], "usage": _usage([final])})
        except EngineDeadError as e:
            yield _sse(APIError(503, str(e)).body())
        yield "data: [DONE]\n\n"


# apply_chat_template's parameters that choose the template or shape its output; a request sets
# the first two through their own fields, the rest belong to the server.
_TEMPLATE_VARIABLES = frozenset({"chat_template", "tools", "documents", "continue_final_message"})


def _chat_template_parameters(tokenizer: Any) -> frozenset[str]:
    """apply_chat_template's own parameters (tokenize, return_tensors, ...), which a request
    must not set through chat_template_kwargs."""
    if tokenizer is None:
        return frozenset()
    params = inspect.signature(tokenizer.apply_chat_template).parameters.values()
    own = {p.name for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD}
    return frozenset(own - _TEMPLATE_VARIABLES)


class _SSEResponse(StreamingResponse):
    """Server-sent events whose engine requests are aborted however the response ends
    (finished, client gone, server shutting down)."""

    def __init__(self, chunks: AsyncIterator[str], streams: list[RequestStream]) -> None:
        super().__init__(chunks, media_type="text/event-stream")
        self._streams = streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for stream in self._streams:
                stream.close()


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several requests as they come, tagged with the request's position."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
            queue.put_nowait((i, None))
        except Exception as e:
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.close()


async def _collect(streams: list[RequestStream]) -> list[RequestOutput]:
    finals: list[RequestOutput | None] = [None] * len(streams)
    async for i, out in _merge(streams):
        finals[i] = out
    if any(f is None for f in finals):
        raise EngineDeadError("a request ended without output")
    return finals  # type: ignore[return-value]


async def _until_disconnected(raw: Request, work: Awaitable[T]) -> T | None:
    """Run `work` unless the client disconnects first (then cancel it, aborting its requests)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await raw.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return task.result() if not task.cancelled() else None


def _completion_choice(
    req: CompletionRequest,
    c: CompletionOutput,
    echo: tuple[str, dict[str, Any] | None] | None,
    cursor: ChoiceCursor | None = None,
) -> tuple[dict[str, Any], int]:
    """A completions choice's text, logprobs and finish_reason, and the text offset after it:
    all of `c`, or in a stream what `cursor` has not sent; `echo` (the prompt's text and
    logprobs) goes first."""
    start, text_start, offset = (
        (cursor.prev_tokens, cursor.prev_text, cursor.offset) if cursor else (0, 0, 0)
    )
    prompt_text, prompt_lps = echo or ("", None)
    logprobs, end = None, offset
    if req.logprobs is not None:
        logprobs, end = completion_logprobs(c, start, req.logprobs, offset + len(prompt_text))
        if prompt_lps is not None:
            logprobs = {key: prompt_lps[key] + logprobs[key] for key in logprobs}
    text = prompt_text + c.text[text_start:]
    return {"text": text, "logprobs": logprobs, "finish_reason": c.finish_reason}, end


def _usage(finals: Sequence[RequestOutput | None]) -> dict[str, int]:
    prompt = sum(len(f.prompt_token_ids) for f in finals if f is not None)
    completion = sum(len(c.token_ids) for f in finals if f is not None for c in f.outputs)
    return _usage_body(prompt, completion)


def _usage_body(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
