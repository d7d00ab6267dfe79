"""`AsyncLLM` (vLLM's name): the asyncio frontend of an engine core running in its own process.

Validation and tokenization (InputProcessor) happen here, before anything is sent, so bad input
raises ValueError with nothing queued. One task reads the core's output socket, turns
EngineCoreOutputs into RequestOutputs (OutputProcessor: detokenization, stop strings) and hands
each to its request's stream; stop strings found here go back to the core as aborts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from compiled_llm.config import EngineArgs
from compiled_llm.engine.messages import EngineCoreOutputs, EngineCoreRequest, SchedulerStatsMsg
from compiled_llm.engine.output_processor import OutputProcessor
from compiled_llm.engine.processor import InputProcessor, PromptType
from compiled_llm.models.loader import load_tokenizer
from compiled_llm.outputs import RequestOutput
from compiled_llm.sampling_params import SamplingParams
from compiled_llm.server.core_client import CoreClient
from compiled_llm.server.messages import CoreFailed, CoreReady, OutputType, UtilityResult
from compiled_llm.server.streams import RequestCollector, RequestStream

logger = logging.getLogger(__name__)
T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine-core process is gone; nothing more can be served."""


class EngineOverloadedError(RuntimeError):
    """More requests are waiting for their first token than the configured limit."""


class UtilityRefusedError(RuntimeError):
    """A utility call the core refused in its current state (a profile already running)."""


class EngineMetrics(Protocol):
    """What the engine reports as it runs (server/metrics.py implements it for Prometheus)."""

    def on_step(self, stats: SchedulerStatsMsg) -> None: ...
    def on_request_added(self, num_prompt_tokens: int) -> None: ...
    def on_tokens(self, num_new: int, ttft: float | None, itl: float | None) -> None: ...
    def on_request_done(self, outcome: str, e2e: float) -> None: ...


class AsyncLLM:
    def __init__(
        self,
        engine_kwargs: dict[str, Any],
        *,
        max_waiting_requests: int | None = None,
        metrics: EngineMetrics | None = None,
    ) -> None:
        """Validates the arguments here; `start()` launches the core and waits until it is ready."""
        self.engine_kwargs = dict(engine_kwargs)
        self.config = EngineArgs.from_kwargs(**self.engine_kwargs).create_config()
        self.max_waiting_requests = max_waiting_requests
        self.metrics = metrics
        self.tokenizer: Any = None
        self.processor: InputProcessor | None = None
        self.output_processor: OutputProcessor | None = None
        self.client: CoreClient | None = None
        self.ready: CoreReady | None = None
        self.last_stats: SchedulerStatsMsg | None = None
        self.dead_reason: str | None = None
        self.on_dead: list[Callable[[str], None]] = []
        self._streams: dict[str, RequestCollector] = {}
        self._num_waiting = 0
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._output_task: asyncio.Task[None] | None = None
        # One thread, as in vLLM: a tokenizer is not safe to share between threads, and the
        # request-body limit bounds how long one item can hold it.
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="tokenizer")

    async def start(self) -> AsyncLLM:
        """Spawn the core and wait for its ready message (engine built: loaded, compiled).
        Callers' scripts need an `if __name__ == "__main__":` guard (multiprocessing spawn)."""
        self.client = CoreClient(self.engine_kwargs)
        mc = self.config.model_config
        try:
            if not mc.skip_tokenizer_init:  # loads while the core builds the model
                self.tokenizer = await asyncio.to_thread(
                    load_tokenizer, mc.tokenizer, mc.trust_remote_code
                )
            self.processor = InputProcessor(mc, self.tokenizer)
            self.output_processor = OutputProcessor(self.tokenizer)
            self.ready = await self.client.wait_ready()
        except BaseException:
            self.client.shutdown()
            raise
        loop = asyncio.get_running_loop()
        loop.add_reader(self.client.proc.sentinel, self._on_core_exit)
        self._output_task = loop.create_task(self._output_loop(), name="engine-outputs")
        return self

    # --- requests -------------------------------------------------------------------------------
    @property
    def is_alive(self) -> bool:
        return self.dead_reason is None and self.client is not None and self.client.is_alive()

    @property
    def num_waiting(self) -> int:
        """Samples sent to the core that have not produced their first token."""
        return self._num_waiting

    async def generate(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams,
        request_id: str,
        priority: int = 0,
    ) -> RequestStream:
        """Validate, tokenize (on the tokenizer thread) and send (ValueError for bad input,
        EngineOverloadedError; nothing is sent or counted then); iterate the result with
        `async for` for cumulative outputs. Closing it, or cancelling the task iterating it,
        aborts the request and frees its KV blocks."""
        self._check_alive()
        assert self.processor is not None
        processed = await self.run_blocking(
            self.processor.process, request_id, prompt, sampling_params, priority
        )
        return self._submit(request_id, *processed)

    def _submit(
        self,
        request_id: str,
        text: str | None,
        ids: list[int],
        params: SamplingParams,
        core_requests: list[EngineCoreRequest],
    ) -> RequestStream:
        """Register and send a processed request: everything that can fail (the id, the waiting
        limit, encoding) is checked before any state changes, so a failure leaks nothing."""
        self._check_alive()
        assert self.client is not None and self.output_processor is not None
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        limit = self.max_waiting_requests
        if limit is not None and self._num_waiting + len(core_requests) > limit:
            raise EngineOverloadedError(
                f"{self._num_waiting} requests are waiting, the limit is {limit}; retry later"
            )
        payloads = [self.client.encode_add(r) for r in core_requests]
        arrival = core_requests[0].arrival_time
        child_ids = [r.request_id for r in core_requests]
        self.output_processor.add_request(request_id, text, ids, params, child_ids, arrival)
        stream = self._streams[request_id] = RequestCollector(len(core_requests), arrival)
        self._num_waiting += len(core_requests)
        for payload in payloads:
            self.client.send_add(payload)
        if self.metrics:
            self.metrics.on_request_added(len(ids) * len(core_requests))
        return RequestStream(request_id, stream, self.abort_now)

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run tokenizer work (encoding, chat templates, decoding large inputs) on the one
        tokenizer thread, so the event loop keeps serving while it runs."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer_thread, fn, *args)

    def _check_alive(self) -> None:
        if self.dead_reason is not None or self.client is None:
            raise EngineDeadError(self.dead_reason or "the engine is not started")

    def abort_now(self, request_id: str) -> None:
        """Synchronous abort (safe in a `finally`): the core frees the request's blocks."""
        stream = self._streams.pop(request_id, None)
        if stream is None or self.output_processor is None or self.client is None:
            return
        children = self.output_processor.child_ids(request_id)
        self.output_processor.abort(request_id)
        self._num_waiting -= stream.num_waiting
        stream.close()
        if children and self.is_alive:
            self.client.send_abort(children, "abort")
        if self.metrics:
            self.metrics.on_request_done("abort", time.monotonic() - stream.arrival)

    def abort_all(self, reason: str) -> None:
        """Abort every request; their iterators raise EngineDeadError(reason)."""
        error = EngineDeadError(reason)
        for request_id, stream in list(self._streams.items()):
            self.abort_now(request_id)
            stream.fail(error)

    # --- utility calls --------------------------------------------------------------------------
    async def call_utility(self, method: str, *args: Any, timeout: float = 60.0) -> Any:
        if not self.is_alive or self.client is None:
            raise EngineDeadError(self.dead_reason or "the engine core is not running")
        call_id = self.client.send_utility(method, list(args))
        future = self._calls[call_id] = asyncio.get_running_loop().create_future()
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._calls.pop(call_id, None)

    # --- outputs --------------------------------------------------------------------------------
    async def _output_loop(self) -> None:
        assert self.client is not None
        try:
            while True:
                kind, msg = await self.client.recv()
                if kind == OutputType.OUTPUTS.value:
                    self._on_outputs(msg)
                elif kind == OutputType.UTILITY.value:
                    self._on_utility(msg)
                elif kind == OutputType.FAILED.value:
                    assert isinstance(msg, CoreFailed)
                    self._die(f"the engine core failed: {msg.message}")
                    return
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.exception("output handler failed")
            self._die(f"the output handler failed: {e}")

    def _on_outputs(self, msg: EngineCoreOutputs) -> None:
        assert self.output_processor is not None and self.client is not None
        if msg.stats is not None:
            self.last_stats = msg.stats
            if self.metrics:
                self.metrics.on_step(msg.stats)
        if not msg.outputs:
            return
        outputs, to_stop = self.output_processor.process_outputs(msg.outputs)
        if to_stop:
            self.client.send_abort(to_stop, "stop")
        now = time.monotonic()
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            self._account(stream, out, now)
            stream.put(out)
            if out.finished:
                del self._streams[out.request_id]
                if self.metrics:
                    reason = out.outputs[0].finish_reason if out.outputs else None
                    self.metrics.on_request_done(reason or "abort", now - stream.arrival)

    def _account(self, stream: RequestCollector, out: RequestOutput, now: float) -> None:
        num_tokens = sum(len(c.token_ids) for c in out.outputs)
        waiting = sum(1 for c in out.outputs if not c.token_ids and c.finish_reason is None)
        self._num_waiting -= stream.num_waiting - waiting
        stream.num_waiting = waiting
        new = num_tokens - stream.num_tokens
        if new <= 0:
            return
        first = stream.last_token_time is None
        ttft = now - stream.arrival if first else None
        itl = None if stream.last_token_time is None else now - stream.last_token_time
        stream.num_tokens, stream.last_token_time = num_tokens, now
        if self.metrics:
            self.metrics.on_tokens(new, ttft, itl)

    def _on_utility(self, msg: UtilityResult) -> None:
        future = self._calls.get(msg.call_id)
        if future is None or future.done():
            return
        if msg.error is not None:
            error = UtilityRefusedError if msg.refused else RuntimeError
            future.set_exception(error(msg.error))
        else:
            future.set_result(msg.result)

    # --- failure and shutdown -------------------------------------------------------------------
    def _on_core_exit(self) -> None:
        assert self.client is not None
        asyncio.get_running_loop().remove_reader(self.client.proc.sentinel)
        self.client.proc.join(timeout=1.0)
        self._die(f"the engine core process exited (exit code {self.client.proc.exitcode})")

    def _die(self, reason: str) -> None:
        if self.dead_reason is not None:
            return
        logger.error("%s", reason)
        self.dead_reason = reason
        error = EngineDeadError(reason)
        for stream in self._streams.values():
            stream.fail(error)
        self._streams.clear()
        self._num_waiting = 0
        for future in self._calls.values():
            if not future.done():
                future.set_exception(error)
        for callback in self.on_dead:
            callback(reason)

    async def shutdown(self) -> None:
        """Abort what runs, stop the output task and the core process."""
        for request_id in list(self._streams):
            self.abort_now(request_id)
        if self._output_task is not None:
            self._output_task.cancel()
            await asyncio.gather(self._output_task, return_exceptions=True)
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)
        if self.client is not None:
            asyncio.get_running_loop().remove_reader(self.client.proc.sentinel)
            await asyncio.to_thread(self.client.shutdown)
