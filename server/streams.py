"""Per-request output streams between the engine client's output task and its readers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from compiled_llm.outputs import RequestOutput


class RequestCollector:
    """Latest cumulative output of one request (a slow reader skips to the newest), plus the
    frontend's per-request bookkeeping."""

    def __init__(self, num_samples: int, arrival: float) -> None:
        self.event = asyncio.Event()
        self.output: RequestOutput | None = None
        self.error: BaseException | None = None
        self.closed = False
        self.arrival = arrival
        self.num_waiting = num_samples  # samples that have no token yet
        self.num_tokens = 0
        self.last_token_time: float | None = None

    def put(self, output: RequestOutput) -> None:
        self.output = output
        self.event.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.event.set()

    def close(self) -> None:
        self.closed = True
        self.event.set()

    async def get(self) -> RequestOutput | None:
        """The next output; None once aborted."""
        while True:
            await self.event.wait()
            self.event.clear()
            if self.output is not None:
                out, self.output = self.output, None
                return out
            if self.error is not None:
                raise self.error
            if self.closed:
                return None


class RequestStream:
    """Async iterator over one request's cumulative outputs; ends after the finished one."""

    def __init__(
        self, request_id: str, collector: RequestCollector, abort: Callable[[str], None]
    ) -> None:
        self.request_id = request_id
        self._collector = collector
        self._abort = abort
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            out = await self._collector.get()
        except BaseException:  # cancelled (client gone) or the engine died
            self.close()
            raise
        if out is None:  # aborted by someone else
            self._done = True
            raise StopAsyncIteration
        self._done = out.finished
        return out

    def close(self) -> None:
        """Abort the request unless it finished; idempotent and synchronous."""
        if not self._done:
            self._done = True
            self._abort(self.request_id)

    async def aclose(self) -> None:
        self.close()
