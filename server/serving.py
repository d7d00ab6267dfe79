"""/v1/completions and /v1/chat/completions: a request becomes one engine request per prompt
(`n` fans out inside the engine); outputs become OpenAI-shaped JSON, or SSE chunks ending with
`data: [DONE]`. A client that disconnects has its requests aborted (KV blocks freed).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from compiled_llm.engine.processor import PromptType
from compiled_llm.outputs import RequestOutput
from compiled_llm.sampling_params import SamplingParams
from compiled_llm.server.engine_client import AsyncEngine, EngineDeadError, EngineOverloadedError
from compiled_llm.server.logprobs import ChoiceCursor, chat_logprobs, completion_logprobs
from compiled_llm.server.metrics import ServerMetrics
from compiled_llm.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    param_of,
)
from compiled_llm.server.streams import RequestStream

T = TypeVar("T")


class OpenAIServing:
    def __init__(
        self, engine: AsyncEngine, model_names: list[str], metrics: ServerMetrics | None
    ) -> None:
        self.engine = engine
        self.model_names = model_names
        self.metrics = metrics

    def check_model(self, name: str | None) -> str:
        if name is None or name in self.model_names:
            return self.model_names[0]
        raise APIError(404, f"the model {name!r} does not exist", "model")

    # --- endpoints ------------------------------------------------------------------------------
    async def completions(self, req: CompletionRequest, raw: Request) -> Response:
        model = self.check_model(req.model)
        params = self._admit(req.to_sampling_params)
        prompts: list[PromptType] = list(self._admit(req.prompts))
        base_id = f"cmpl-{uuid.uuid4().hex}"
        streams = self._start(base_id, prompts, params, req.priority)
        head = {"id": base_id, "created": int(time.time()), "model": model}
        k = req.logprobs
        if req.stream:
            chunks = self._completion_chunks(req, streams, head)
            return _SSEResponse(chunks, streams)
        finals = await _until_disconnected(raw, _collect(streams))
        if finals is None:
            return Response(status_code=499)
        choices = []
        for i, out in enumerate(finals):
            for c in out.outputs:
                choice: dict[str, Any] = {"index": i * params.n + c.index, "text": c.text}
                choice["logprobs"] = None if k is None else completion_logprobs(c, 0, k, 0)[0]
                choice["finish_reason"] = c.finish_reason
                choices.append(choice)
        body = {**head, "object": "text_completion", "choices": choices, "usage": _usage(finals)}
        return JSONResponse(body)

    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Response:
        model = self.check_model(req.model)
        params = self._admit(req.to_sampling_params)
        prompt = self._admit(lambda: self._chat_prompt(req))
        base_id = f"chatcmpl-{uuid.uuid4().hex}"
        streams = self._start(base_id, [prompt], params, req.priority)
        head = {"id": base_id, "created": int(time.time()), "model": model}
        if req.stream:
            return _SSEResponse(self._chat_chunks(req, streams[0], head), streams)
        finals = await _until_disconnected(raw, _collect(streams))
        if finals is None:
            return Response(status_code=499)
        k = req.top_logprobs or 0
        choices = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": chat_logprobs(c, 0, k) if req.logprobs else None,
                "finish_reason": c.finish_reason,
            }
            for c in finals[0].outputs
        ]
        body = {**head, "object": "chat.completion", "choices": choices, "usage": _usage(finals)}
        return JSONResponse(body)

    # --- admission ------------------------------------------------------------------------------
    def _admit(self, fn: Callable[[], T]) -> T:
        """Run a validation step; ValueError -> 400 naming the field, overload -> 503."""
        try:
            return fn()
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

    def _start(
        self, base_id: str, prompts: list[PromptType], params: SamplingParams, priority: int
    ) -> list[RequestStream]:
        streams: list[RequestStream] = []
        try:
            for i, prompt in enumerate(prompts):
                request_id = f"{base_id}-{i}"

                def add(p: PromptType = prompt, r: str = request_id) -> RequestStream:
                    return self.engine.generate(p, params, r, priority)

                streams.append(self._admit(add))
        except BaseException:
            for stream in streams:
                stream.close()
            raise
        return streams

    def _chat_prompt(self, req: ChatCompletionRequest) -> PromptType:
        tokenizer = self.engine.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("messages: this model has no tokenizer chat template")
        try:
            ids = tokenizer.apply_chat_template(
                [m.to_template() for m in req.messages],
                add_generation_prompt=req.add_generation_prompt,
                tokenize=True,
                **(req.chat_template_kwargs or {}),
            )
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
                    delta = cursor.advance(c)
                    if delta is None:
                        continue
                    choice: dict[str, Any] = {"index": index, "text": delta}
                    if req.logprobs is not None:
                        lp, cursor.offset = completion_logprobs(
                            c, cursor.prev_tokens, req.logprobs, cursor.offset
                        )
                        choice["logprobs"] = lp
                    else:
                        choice["logprobs"] = None
                    choice["finish_reason"] = c.finish_reason
                    cursor.commit(c)
                    yield _sse({**head, "choices": [choice]})
            if req.include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(finals)})
        except EngineDeadError as e:
            yield _sse(APIError(503, str(e)).body())
        yield "data: [DONE]\n\n"

    async def _chat_chunks(
        self, req: ChatCompletionRequest, stream: RequestStream, head: dict[str, Any]
    ) -> AsyncIterator[str]:
        head = {**head, "object": "chat.completion.chunk"}
        cursors: dict[int, ChoiceCursor] = {}
        final: RequestOutput | None = None
        k = req.top_logprobs or 0
        try:
            for index in range(req.n):
                role = {"role": "assistant", "content": ""}
                choice = {"index": index, "delta": role, "logprobs": None, "finish_reason": None}
                yield _sse({**head, "choices": [choice]})
            async for out in stream:
                final = out
                for c in out.outputs:
                    cursor = cursors.setdefault(c.index, ChoiceCursor())
                    delta = cursor.advance(c)
                    if delta is None:
                        continue
                    choice = {
                        "index": c.index,
                        "delta": {"content": delta} if delta else {},
                        "logprobs": chat_logprobs(c, cursor.prev_tokens, k)
                        if req.logprobs
                        else None,
                        "finish_reason": c.finish_reason,
                    }
                    cursor.commit(c)
                    yield _sse({**head, "choices": [choice]})
            if req.include_usage:
                yield _sse({**head, "choices": [], "usage": _usage([final])})
        except EngineDeadError as e:
            yield _sse(APIError(503, str(e)).body())
        yield "data: [DONE]\n\n"


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


def _usage(finals: Sequence[RequestOutput | None]) -> dict[str, int]:
    prompt = sum(len(f.prompt_token_ids) for f in finals if f is not None)
    completion = sum(len(c.token_ids) for f in finals if f is not None for c in f.outputs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
