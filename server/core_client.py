"""The frontend's end of the wire: spawns the engine-core process and owns the ZeroMQ sockets.

Sockets are IPC files in a private temporary directory (no fixed ports or paths). Input goes out
on a plain PUSH socket with no high-water mark, so `send_*` never blocks the event loop and can be
called from synchronous code (a `finally` that aborts); outputs arrive on an asyncio PULL socket.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import os
import shutil
import tempfile
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from compiled_llm.engine.messages import EngineCoreRequest
from compiled_llm.server.core_process import run_engine_core
from compiled_llm.server.messages import (
    AbortRequests,
    CoreFailed,
    CoreReady,
    OutputType,
    RequestType,
    UtilityCall,
    decode_output,
)

logger = logging.getLogger(__name__)


class EngineCoreStartError(RuntimeError):
    pass


class CoreClient:
    def __init__(self, engine_kwargs: dict[str, Any]) -> None:
        self._dir = tempfile.mkdtemp(prefix="compiled-llm-")
        os.chmod(self._dir, 0o700)
        input_address = f"ipc://{os.path.join(self._dir, 'input')}"
        output_address = f"ipc://{os.path.join(self._dir, 'output')}"
        self.ctx = zmq.asyncio.Context(io_threads=1)
        self._input: zmq.Socket[bytes] = zmq.Context.shadow(self.ctx.underlying).socket(zmq.PUSH)
        self._input.setsockopt(zmq.SNDHWM, 0)
        self._input.bind(input_address)
        self._output = self.ctx.socket(zmq.PULL)
        self._output.setsockopt(zmq.RCVHWM, 0)
        self._output.bind(output_address)
        self._encoder = msgspec.msgpack.Encoder()
        self._call_ids = itertools.count()
        spawn = multiprocessing.get_context("spawn")
        self.proc = spawn.Process(
            target=run_engine_core,
            args=(
                engine_kwargs,
                input_address,
                output_address,
                self._dir,
                logging.getLogger("compiled_llm").getEffectiveLevel(),
            ),
            name="EngineCore",
            daemon=True,
        )
        self.proc.start()
        self._closed = False
        self._ready = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def is_alive(self) -> bool:
        return self.proc.is_alive()

    async def wait_ready(self, poll_s: float = 0.5) -> CoreReady:
        """Wait for the core's ready message while watching that it is still alive."""
        while True:
            if await self._output.poll(int(poll_s * 1000)):
                kind, msg = await self.recv()
                if kind == OutputType.READY.value:
                    self._ready = True
                    return msg
                if kind == OutputType.FAILED.value:
                    assert isinstance(msg, CoreFailed)
                    self.proc.join(timeout=5)
                    raise EngineCoreStartError(msg.message)
                logger.warning("ignoring a %r message before the core was ready", kind)
            elif not self.proc.is_alive():
                raise EngineCoreStartError(
                    f"the engine core process exited during startup (exit code {self.proc.exitcode})"
                )

    async def recv(self) -> tuple[bytes, Any]:
        kind, payload = await self._output.recv_multipart(copy=False)
        return kind.bytes, decode_output(kind.bytes, payload.buffer)

    def _send(self, kind: RequestType, msg: Any) -> None:
        self._send_bytes(kind, self._encoder.encode(msg))

    def _send_bytes(self, kind: RequestType, payload: bytes) -> None:
        self._input.send_multipart([kind.value, payload], copy=False)

    def encode_add(self, request: EngineCoreRequest) -> bytes:
        """The ADD message's payload; encoding first lets a caller send all or nothing."""
        return self._encoder.encode(request)

    def send_add(self, payload: bytes) -> None:
        self._send_bytes(RequestType.ADD, payload)

    def send_abort(self, request_ids: list[str], reason: str = "abort") -> None:
        self._send(RequestType.ABORT, AbortRequests(request_ids, reason))

    def send_utility(self, method: str, args: list[Any]) -> int:
        call_id = next(self._call_ids)
        self._send(RequestType.UTILITY, UtilityCall(call_id, method, args))
        return call_id

    def shutdown(self, timeout: float = 5.0) -> None:
        """Ask the core to stop, then terminate and finally kill it; remove the socket files."""
        if self._closed:
            return
        self._closed = True
        if self.proc.is_alive() and self._ready:  # a core still starting has no loop to ask
            with contextlib.suppress(zmq.ZMQError):
                self.send_utility("shutdown", [])
            self.proc.join(timeout)
        if self.proc.is_alive():
            logger.warning("engine core did not stop in %.0f s: terminating it", timeout)
            self.proc.terminate()
            self.proc.join(2.0)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(2.0)
        self._input.close(linger=0)
        self._output.close(linger=0)
        self.ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)
