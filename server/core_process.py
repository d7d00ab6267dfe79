"""The engine core in a process of its own, fed over ZeroMQ by the API frontend.

One thread receives and decodes input into a queue, another encodes and sends outputs, so the
busy loop (take all queued input, then `step()` while there is work; block on the queue when
idle) never waits on a socket. Started by `core_client.CoreClient` with multiprocessing spawn.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import shutil
import signal
import threading
import time
import traceback
from typing import Any

import msgspec
import zmq
from tqdm import tqdm

from compiled_llm.config import EngineArgs
from compiled_llm.engine.core import EngineCore
from compiled_llm.engine.messages import EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest
from compiled_llm.server.messages import (
    AbortRequests,
    CoreFailed,
    CoreReady,
    OutputType,
    RequestType,
    UtilityCall,
    UtilityResult,
    decode_request,
)

logger = logging.getLogger(__name__)

UTILITY_METHODS = frozenset(
    {"ping", "reset_prefix_cache", "start_profile", "stop_profile", "shutdown"}
)
_PARENT_CHECK_S = 1.0  # how often the loop checks its frontend and input thread are alive
_SHUTDOWN = object()


def run_engine_core(
    engine_kwargs: dict[str, Any],
    input_address: str,
    output_address: str,
    socket_dir: str,
    log_level: int = logging.INFO,
) -> None:
    """Process entry point: build the engine from EngineArgs keywords, serve until told to stop,
    the frontend disappears, or an error (reported to the frontend, then exit status 1). The
    socket folder is removed on the way out too: the frontend may be gone (killed) already.
    `log_level` is the frontend's level for compiled_llm's loggers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the frontend, which stops us
    signal.signal(signal.SIGTERM, lambda *_: _raise_exit())
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s core %(name)s: %(message)s")
    logging.getLogger("compiled_llm").setLevel(log_level)
    # tqdm makes a multiprocessing lock for its first bar (torch.fx and our piece compiler
    # create bars while compiling): a named semaphore under spawn, which this process's exit
    # (os._exit, no finalizers) never unlinks, so the resource tracker warned of a leaked
    # semaphore at every shutdown. The core's bars only ever need a thread lock.
    tqdm.set_lock(threading.RLock())
    proc = EngineCoreProc(input_address, output_address)
    code = 0
    try:
        proc.start(engine_kwargs)
        proc.run_busy_loop()
    except SystemExit:
        pass
    except BaseException as e:  # reported, then the process exits non-zero
        logger.exception("engine core failed")
        proc.send(OutputType.FAILED, CoreFailed(f"{type(e).__name__}: {e}"))
        code = 1
    finally:
        if proc.core is not None:  # tensor-parallel workers: stopped, not left to notice
            proc.core.shutdown()
        proc.close()
        shutil.rmtree(socket_dir, ignore_errors=True)
    os._exit(code)  # skip interpreter teardown: torch and ZeroMQ threads can stall it


def _raise_exit() -> None:
    raise SystemExit(0)


class EngineCoreProc:
    def __init__(self, input_address: str, output_address: str) -> None:
        self.ctx = zmq.Context(io_threads=1)
        self.input_queue: queue.Queue[tuple[bytes, Any]] = queue.Queue()
        self.output_queue: queue.Queue[Any] = queue.Queue()
        self.core: EngineCore | None = None
        self._stop = False
        self._stats_dirty = False
        self._parent = multiprocessing.parent_process()
        self._last_parent_check = time.monotonic()
        self._in_thread = threading.Thread(
            target=self._input_thread, args=(input_address,), name="core-input", daemon=True
        )
        self._out_thread = threading.Thread(
            target=self._output_thread, args=(output_address,), name="core-output", daemon=True
        )
        self._in_thread.start()
        self._out_thread.start()

    def start(self, engine_kwargs: dict[str, Any]) -> None:
        started = time.monotonic()
        config = EngineArgs.from_kwargs(**engine_kwargs).create_config()
        self.core = EngineCore(config)
        ready = CoreReady(
            pid=os.getpid(),
            num_blocks=self.core.num_blocks,
            block_size=config.cache_config.block_size,
            max_model_len=config.model_config.max_model_len,
            startup_seconds=time.monotonic() - started,
        )
        self.send(OutputType.READY, ready)
        self._stats_dirty = True  # the first loop turn reports the empty cache's stats

    # --- I/O threads ----------------------------------------------------------------------------
    def _input_thread(self, address: str) -> None:
        sock = self.ctx.socket(zmq.PULL)
        sock.connect(address)
        try:
            while True:
                kind, payload = sock.recv_multipart(copy=False)
                try:
                    msg = decode_request(kind.bytes, payload.buffer)
                except (KeyError, msgspec.DecodeError) as e:
                    self._on_malformed(kind.bytes, payload.buffer, e)
                    continue
                self.input_queue.put((kind.bytes, msg))
        except zmq.ContextTerminated:
            pass
        finally:
            sock.close(linger=0)

    def _output_thread(self, address: str) -> None:
        encoder = msgspec.msgpack.Encoder()
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.connect(address)
        try:
            while (item := self.output_queue.get()) is not _SHUTDOWN:
                kind, msg = item
                sock.send_multipart([kind, encoder.encode(msg)], copy=False)
        except BaseException:
            # Nothing can reach the frontend any more: exit, so that it sees the process die.
            logger.exception("engine core output thread failed")
            os._exit(1)
        finally:
            sock.close(linger=2000)  # flush what is queued (a final error, say) before exit

    def _on_malformed(self, kind: bytes, payload: memoryview, error: Exception) -> None:
        """An ADD the core cannot decode (its SamplingParams refused a value, say) still ends:
        its request id is read from the raw message and the request finishes as aborted."""
        logger.error("malformed input message: %s", error)
        if kind != RequestType.ADD.value:
            return
        with contextlib.suppress(msgspec.DecodeError):
            raw = msgspec.msgpack.decode(payload)
            if isinstance(raw, list) and raw and isinstance(raw[0], str):
                self._reject(raw[0])

    def _reject(self, request_id: str) -> None:
        done = EngineCoreOutput(request_id, [], finish_reason="abort")
        self.send(OutputType.OUTPUTS, EngineCoreOutputs(outputs=[done]))

    def send(self, kind: OutputType, msg: Any) -> None:
        self.output_queue.put((kind.value, msg))

    def close(self) -> None:
        """Flush queued outputs (a final error message, say); the process exits right after."""
        self.output_queue.put(_SHUTDOWN)
        self._out_thread.join(timeout=5)
        if not self._out_thread.is_alive():
            self.ctx.term()  # waits for the output socket's linger; stops the input thread

    # --- the loop -------------------------------------------------------------------------------
    def run_busy_loop(self) -> None:
        core = self.core
        assert core is not None
        while not self._stop:
            self._process_input(block=not core.has_unfinished_requests() and not self._stats_dirty)
            if core.has_unfinished_requests() or self._stats_dirty:
                # An idle step still reports stats: freed blocks after aborts reach /metrics.
                self._stats_dirty = False
                self.send(OutputType.OUTPUTS, core.step())

    def _process_input(self, block: bool) -> None:
        while True:
            try:
                kind, msg = self.input_queue.get(block=block, timeout=_PARENT_CHECK_S)
            except queue.Empty:
                self._check_liveness()
                if block:
                    continue
                return
            block = False
            self._handle(kind, msg)
            self._check_liveness()

    def _check_liveness(self) -> None:
        now = time.monotonic()
        if now - self._last_parent_check < _PARENT_CHECK_S:
            return
        self._last_parent_check = now
        if self._parent is not None and not self._parent.is_alive():
            logger.warning("frontend process is gone: engine core exits")
            raise SystemExit(0)
        if not self._in_thread.is_alive():
            raise RuntimeError("the engine core's input thread died")
        if self.core is not None:  # a tensor-parallel worker that died while idle
            self.core.check_health()

    def _handle(self, kind: bytes, msg: Any) -> None:
        core = self.core
        assert core is not None
        if kind == RequestType.ADD.value:
            assert isinstance(msg, EngineCoreRequest)
            try:
                core.add_request(msg)
            except ValueError as e:  # the frontend validates; this is a backstop
                logger.error("rejected request %s: %s", msg.request_id, e)
                self._reject(msg.request_id)
        elif kind == RequestType.ABORT.value:
            assert isinstance(msg, AbortRequests)
            core.abort_requests(msg.request_ids, msg.reason)
            self._stats_dirty = True
        elif kind == RequestType.UTILITY.value:
            assert isinstance(msg, UtilityCall)
            self.send(OutputType.UTILITY, self._utility(msg))

    def _utility(self, call: UtilityCall) -> UtilityResult:
        core = self.core
        assert core is not None
        if call.method == "shutdown":
            self._stop = True
            return UtilityResult(call.call_id, True)
        if call.method not in UTILITY_METHODS:  # the frontend checks; this is a backstop
            return UtilityResult(call.call_id, error=f"unknown utility method {call.method!r}")
        try:
            if call.method == "ping":
                return UtilityResult(call.call_id, "pong")
            if call.method == "reset_prefix_cache":
                return UtilityResult(call.call_id, bool(core.reset_prefix_cache()))
            hook = getattr(core, call.method, None)
            if hook is None:
                raise RuntimeError(f"this engine core has no profiler hook ({call.method})")
            if call.method == "start_profile":
                profile_dir = core.config.observability_config.profile_dir
                if profile_dir is None:
                    raise ValueError("profiling needs --profile-dir")
                result = hook(profile_dir)
            else:
                result = hook()  # stop_profile: the trace's path
            return UtilityResult(call.call_id, True if result is None else result)
        except ValueError as e:  # not possible in the current state (a profile already running)
            return UtilityResult(call.call_id, error=str(e), refused=True)
        except Exception as e:
            logger.warning("utility %s failed: %s", call.method, traceback.format_exc())
            return UtilityResult(call.call_id, error=f"{type(e).__name__}: {e}")
