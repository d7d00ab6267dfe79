"""Tensor parallelism in the engine (docs/tensor_parallel.md): rank 0 in the engine core's
process, ranks 1..N-1 in worker processes (`distributed_executor_backend="mp"`, here) or Ray
actors (`"ray"`, engine/ray_executor.py). Both launchers run the same worker loop
(`run_worker`), fed through a link with a multiprocessing pipe's `send` / `recv_bytes`.

`create_model_runner` returns today's `ModelRunner` for `tensor_parallel_size == 1` (nothing
here runs then) and a `DriverRunner` otherwise. The driver spawns the workers, joins the process
group with them (gloo on CPU, NCCL on CUDA, one GPU per rank) and is rank 0: it loads its
shards, schedules nothing itself (the core's scheduler drives it as it drives a plain runner)
and, for each step, sends the step's host arrays (`HostInputs`) to every worker in one message
before launching its own forward. Each worker builds the same device inputs from them and runs
the same forward; the collectives inside it meet rank 0's. Only rank 0 computes logits and
samples; a token the step still in flight is sampling (async scheduling) reaches the workers by
one broadcast from rank 0 on the device, so no rank waits for the host.

Start-up is the same sequence on every rank (load, size the KV cache, compile, capture graphs),
so the dummy runs and graph captures meet in the same collectives; the KV-cache block count is
the minimum over the ranks (`ModelRunner.determine_num_blocks`).

Faults: a worker that fails at start-up reports its traceback before exiting; a worker that dies
later is seen by a monitor thread (its process sentinel). Either way the driver raises a
RuntimeError naming the rank and stops the other workers. A worker exits by itself when the
engine core's process is gone (parent watchdog), so none is left behind.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import socket
import threading
import time
import traceback
import weakref
from collections.abc import Iterator
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, NoReturn, Protocol

import numpy as np
import torch
import torch.distributed as dist

from compiled_llm.child_process import exit_with_parent
from compiled_llm.config import EngineConfig
from compiled_llm.engine.model_runner import (
    HostInputs,
    LaunchedStep,
    ModelRunner,
    ModelRunnerOutput,
    StepHandle,
)
from compiled_llm.engine.scheduler import SchedulerOutput
from compiled_llm.profiler import Profiler

logger = logging.getLogger(__name__)

_STOP_TIMEOUT_S = 10.0  # how long a worker gets to exit after being asked
_READY_TIMEOUT_S = 300.0  # how long rank 0, started, waits for the workers' start-up to end
_JOIN_TIMEOUT_S = 120.0  # how long a worker may take to import torch and reach the rendezvous
_SPAWN_HINT = (
    ". Workers start with multiprocessing's spawn method, "
    "which imports the main script again: a script that creates the engine must do so under "
    '`if __name__ == "__main__":`'
)


def create_model_runner(config: EngineConfig, profiler: Profiler | None = None) -> ModelRunner:
    """The engine core's model runner: the plain one, or rank 0 of a tensor-parallel group."""
    if config.parallel_config.tensor_parallel_size == 1:
        return ModelRunner(config, profiler)
    return DriverRunner(config, profiler)


class WorkerFailed(RuntimeError):
    """A tensor-parallel worker died or failed; the engine cannot go on."""


class Workers(Protocol):
    """Ranks 1..N-1 as the driver sees them, whatever runs them (processes, Ray actors)."""

    init_method: str  # torch.distributed's rendezvous, hosted by rank 0
    stopping: threading.Event  # set first when they are stopped on purpose

    def send(self, payload: bytes) -> None:
        """The same step message to every worker (OSError: one is gone)."""

    def expect(self, kind: str, timeout: float, stage: str) -> None:
        """Each worker's `kind` report; WorkerFailed naming a rank that fails or dies first."""

    def reported_error(self) -> str | None:
        """The first traceback a worker reported, "rank R (...): traceback"."""

    def dead(self) -> tuple[int, str] | None:
        """A worker that is gone: its rank and "rank R (pid P) <how it ended>"."""

    def wait_for_death(self) -> tuple[int, str] | None:
        """Block until a worker is gone (as `dead`) or they are stopped (None)."""

    def stop(self) -> None:
        """Stop every worker (idempotent)."""


class Link(Protocol):
    """A worker's end of its channel to rank 0 (a multiprocessing Connection is one)."""

    def send(self, obj: Any) -> None: ...

    def recv_bytes(self) -> bytes: ...


def rank_config(
    config: EngineConfig, rank: int, device: torch.device | None = None
) -> EngineConfig:
    """Rank `rank`'s copy of the config: its rank and, on CUDA, its own GPU (`device`, by
    default cuda:first+rank)."""
    if device is None:
        device = config.device
        if device.type == "cuda":
            device = torch.device("cuda", (device.index or 0) + rank)
    return dataclasses.replace(
        config,
        device=device,
        parallel_config=dataclasses.replace(config.parallel_config, rank=rank),
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _init_process_group(config: EngineConfig, init_method: str) -> None:
    pc = config.parallel_config
    cuda = config.device.type == "cuda"
    if cuda and config.device.index is not None:
        torch.cuda.set_device(config.device)
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=init_method,
        rank=pc.rank,
        world_size=pc.tensor_parallel_size,
    )


@contextlib.contextmanager
def _may_have_children() -> Iterator[None]:
    """Let a daemonic process (the server's engine core) start the workers. multiprocessing
    refuses because a daemon's children would be orphaned when it is terminated; ours are not:
    each exits once its parent is gone (`exit_with_parent`), and the driver stops them."""
    proc_config = multiprocessing.current_process()._config  # type: ignore[attr-defined]
    daemon = proc_config.get("daemon")
    proc_config["daemon"] = False
    try:
        yield
    finally:
        if daemon is not None:
            proc_config["daemon"] = daemon


class ProcessWorkers:
    """`distributed_executor_backend="mp"`: the worker processes of ranks 1..N-1 on this host
    and a pipe to each; stopped by `stop` or, if the driver is dropped without it, by a
    finalizer (also at interpreter exit)."""

    def __init__(self, config: EngineConfig) -> None:
        self.init_method = f"tcp://127.0.0.1:{free_port()}"
        ctx = multiprocessing.get_context("spawn")
        world = config.parallel_config.tensor_parallel_size
        level = logging.getLogger("compiled_llm").getEffectiveLevel()
        self.procs: list[BaseProcess] = []
        self.conns: list[Connection] = []
        self._error: str | None = None  # the first error a worker reported
        self._reading = threading.Lock()  # the engine's thread and the monitor both read
        with _may_have_children():
            for rank in range(1, world):
                ours, theirs = ctx.Pipe()
                proc = ctx.Process(
                    target=worker_main,
                    args=(
                        rank_config(config, rank),
                        self.init_method,
                        theirs,
                        os.getpid(),
                        level,
                    ),
                    name=f"TPWorker-{rank}",
                    daemon=True,
                )
                proc.start()
                theirs.close()
                self.procs.append(proc)
                self.conns.append(ours)
        self.stopping = threading.Event()  # set first when they are stopped on purpose
        self._finalizer = weakref.finalize(
            self, _stop_workers, self.procs, self.conns, self.stopping
        )

    def rank_of(self, index: int) -> int:
        return index + 1

    def send(self, payload: bytes) -> None:
        for conn in self.conns:
            conn.send_bytes(payload)

    def _read(self, i: int) -> tuple[str, Any] | None:
        """Worker i's next message if one is there (None: none, or its pipe is closed)."""
        with self._reading, contextlib.suppress(OSError, EOFError):
            if self.conns[i].poll():
                kind, payload = self.conns[i].recv()
                if kind == "error" and self._error is None:
                    self._error = f"rank {self.rank_of(i)} (pid {self.procs[i].pid}): {payload}"
                return kind, payload
        return None

    def reported_error(self) -> str | None:
        """The first traceback a worker sent before it exited (start-up or step failure)."""
        for i in range(len(self.conns)):
            while self._error is None and self._read(i) is not None:
                pass
        return self._error

    def expect(self, kind: str, timeout: float, stage: str) -> None:
        """Each worker's `kind` message, watching that it is alive meanwhile; WorkerFailed
        naming the rank of one that reports an error, dies or stays silent."""
        deadline = time.monotonic() + timeout
        for i, (conn, proc) in enumerate(zip(self.conns, self.procs)):
            rank = self.rank_of(i)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WorkerFailed(
                        f"tensor-parallel worker rank {rank} (pid {proc.pid}) sent nothing for "
                        f"{timeout:.0f} s {stage}"
                    )
                multiprocessing.connection.wait([conn, proc.sentinel], min(left, 1.0))
                message = self._read(i)
                if message is not None and message[0] == kind:
                    break
                if message is not None and message[0] == "error":
                    raise WorkerFailed(f"tensor-parallel worker failed {stage}: {self._error}")
                if message is None and not proc.is_alive():
                    raise WorkerFailed(
                        f"tensor-parallel worker rank {rank} (pid {proc.pid}) "
                        f"{_describe_exit(proc)} {stage}"
                        + (_SPAWN_HINT if kind == "joining" else "")
                    )

    def _how(self, i: int) -> str:
        proc = self.procs[i]
        return f"rank {self.rank_of(i)} (pid {proc.pid}) {_describe_exit(proc)}"

    def dead(self) -> tuple[int, str] | None:
        for i, proc in enumerate(self.procs):
            if not proc.is_alive():
                return self.rank_of(i), self._how(i)
        return None

    def wait_for_death(self) -> tuple[int, str] | None:
        sentinels = {p.sentinel: i for i, p in enumerate(self.procs)}
        ready = multiprocessing.connection.wait(list(sentinels))
        if self.stopping.is_set():
            return None
        # The sentinel closes with the process's files, a moment before it can be waited for
        # (is_alive() may still say True): take the rank from the sentinel.
        i = sentinels[ready[0]]  # type: ignore[index]
        return self.rank_of(i), self._how(i)

    def stop(self) -> None:
        self._finalizer()


def _stop_workers(
    procs: list[BaseProcess], conns: list[Connection], stopping: threading.Event
) -> None:
    """Ask each worker to stop, then terminate and finally kill what is left."""
    stopping.set()
    for conn in conns:
        with contextlib.suppress(OSError):
            conn.send_bytes(pickle.dumps(None))
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
            proc.join(2.0)
        if proc.is_alive():
            proc.kill()
            proc.join(2.0)
    for conn in conns:
        conn.close()


def _describe_exit(proc: BaseProcess) -> str:
    proc.join(5.0)  # the exit code may lag the sentinel
    code = proc.exitcode
    if code is None:
        return "stopped answering"
    if code < 0:
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


class _CheckedStepHandle(StepHandle):
    """A step of rank 0 whose result is refused once a worker has died: on CUDA the monitor
    aborts NCCL, which ends a collective waiting for the dead peer with meaningless sums."""

    def __init__(self, driver: DriverRunner, *args: Any) -> None:
        super().__init__(*args)
        self.driver = driver

    def result(self) -> ModelRunnerOutput:
        out = super().result()
        if self.driver.failure is not None:
            raise self.driver.failure
        return out


class DriverRunner(ModelRunner):
    """Rank 0 of a tensor-parallel group, in the engine core's process: starts the workers,
    then runs as a ModelRunner on its shard and sends each step's inputs to the workers."""

    def __init__(self, config: EngineConfig, profiler: Profiler | None = None) -> None:
        self.step_handle = functools.partial(_CheckedStepHandle, self)
        if dist.is_initialized():
            raise ValueError(
                "tensor_parallel_size > 1: this process already has a torch.distributed "
                "process group (another tensor-parallel engine still running?); one "
                "tensor-parallel engine per process"
            )
        self.failure: WorkerFailed | None = None
        self._group: Any = None  # the default group this engine made
        self.workers: Workers
        if config.parallel_config.distributed_executor_backend == "ray":
            from compiled_llm.engine.ray_executor import RayWorkers

            ray_workers = RayWorkers(config)
            config = ray_workers.driver_config  # on CUDA: the GPU Ray reserved for rank 0
            self.workers = ray_workers
        else:
            self.workers = ProcessWorkers(config)
        self._monitor = threading.Thread(
            target=self._watch, args=(config.device,), name="tp-monitor", daemon=True
        )
        self._monitor.start()
        try:
            # A worker that dies before the rendezvous would leave rank 0 waiting there for
            # torch's timeout: it says when it gets there.
            self.workers.expect("joining", _JOIN_TIMEOUT_S, "before joining the process group")
            _init_process_group(config, self.workers.init_method)
            self._group = dist.group.WORLD
            # dropped without shutdown(): leave the group, so that a later engine can start
            weakref.finalize(self, _destroy_group, self._group).atexit = False
            # At exit: stop in order (the group, then the workers) before multiprocessing's own
            # exit handler terminates the daemonic workers under a live group (atexit runs the
            # handler registered last first).
            atexit.register(_shutdown_at_exit, weakref.ref(self))
            super().__init__(config, profiler)
        except BaseException as e:
            self._fail_start(e)

    # start-up ----------------------------------------------------------------------------------
    def determine_num_blocks(self) -> int:
        try:
            return super().determine_num_blocks()
        except BaseException as e:
            self._fail_start(e)

    def compile(self) -> None:
        try:
            super().compile()
            self.workers.expect("ready", _READY_TIMEOUT_S, "during start-up")
        except BaseException as e:
            self._fail_start(e)

    def _fail_start(self, error: BaseException) -> NoReturn:
        """Raise the worker's own error where one failed (rank 0's error is then only the
        collective that lost its peer), else rank 0's; stop everything first."""
        if isinstance(error, (WorkerFailed, ValueError)):
            # which rank and why, or rank 0's own refusal (every rank refuses the same way,
            # e.g. a KV cache too small for max_model_len, and rank 0's says it best)
            self.shutdown()
            raise error
        time.sleep(0.2)  # a failed worker's report may still be on its way
        reported = self.workers.reported_error()
        dead = self.workers.dead()
        self.shutdown()
        if reported is not None:
            raise WorkerFailed(
                f"tensor-parallel worker failed during start-up: {reported}"
            ) from error
        if dead is not None:
            raise WorkerFailed(f"tensor-parallel worker {dead[1]} during start-up") from error
        raise error

    # steps -------------------------------------------------------------------------------------
    def device_inputs(
        self, host: HostInputs, previous: StepHandle | None
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        try:
            self.workers.send(pickle.dumps(host, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError as e:
            raise self._failed(e) from e
        return super().device_inputs(host, previous)

    def pending_tokens(self, host: HostInputs, previous: StepHandle | None) -> torch.Tensor:
        tokens = super().pending_tokens(host, previous).contiguous()
        dist.broadcast(tokens, 0)
        return tokens

    def launch(
        self,
        sched: SchedulerOutput,
        block_ids: list[list[int]],
        previous: StepHandle | None = None,
        planned: tuple[HostInputs, np.ndarray] | None = None,
    ) -> LaunchedStep:
        if self.failure is not None:
            raise self.failure
        try:
            return super().launch(sched, block_ids, previous, planned)
        except WorkerFailed:
            raise
        except Exception as e:  # a collective that lost a peer, most likely
            raise self._failed(e) from e

    def _failed(self, error: BaseException) -> BaseException:
        """The engine's end: a WorkerFailed naming the rank that died (or `error` if every
        worker is alive), after stopping the others."""
        if self.failure is None:
            deadline = time.monotonic() + 2.0  # the sentinel may lag a lost connection
            while self.workers.dead() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            found = self.workers.dead()
            if found is None:
                return error
            self._record(*found)
        self.shutdown()
        assert self.failure is not None
        return self.failure

    def _record(self, rank: int, how: str) -> None:
        reported = self.workers.reported_error()
        detail = f":\n{reported}" if reported else ""
        self.failure = WorkerFailed(
            f"tensor-parallel worker {how}; the engine cannot continue{detail}"
        )

    def _watch(self, device: torch.device) -> None:
        """Monitor thread: note a worker's death at once. On CUDA a rank-0 collective whose
        peer died would wait for NCCL's timeout, so the communicator is aborted, which makes
        the waiting operation fail and the next step raise the failure."""
        found = self.workers.wait_for_death()
        if found is None or self.workers.stopping.is_set():
            return
        self._record(*found)
        logger.error("%s", self.failure)
        if device.type == "cuda":
            with contextlib.suppress(Exception):
                dist.distributed_c10d._abort_process_group()

    def check_health(self) -> None:
        if self.failure is not None:
            self.shutdown()
            raise self.failure

    def shutdown(self) -> None:
        """Stop the workers and leave the process group (idempotent)."""
        self.workers.stopping.set()
        _destroy_group(self._group)  # first: a worker waiting in a collective fails at once
        self.workers.stop()


def _shutdown_at_exit(ref: weakref.ref[DriverRunner]) -> None:
    runner = ref()
    if runner is not None:
        runner.shutdown()


def _destroy_group(group: Any) -> None:
    """Leave `group` if it is still the default group (not a later engine's)."""
    if group is not None and dist.is_initialized() and dist.group.WORLD is group:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


# --- the worker process ---------------------------------------------------------------------------


class WorkerRunner(ModelRunner):
    """Ranks 1..N-1: the model runner on this rank's shard, fed by rank 0's step messages.
    It runs the forward only: logits and sampling are rank 0's."""

    def pending_tokens(self, host: HostInputs, previous: StepHandle | None) -> torch.Tensor:
        tokens = torch.empty(len(host.pending_dst), dtype=torch.int64, device=self.device)
        dist.broadcast(tokens, 0)
        return tokens

    @torch.inference_mode()
    def execute(self, host: HostInputs) -> None:
        input_ids, positions, attn = self.device_inputs(host, None)
        self.run_model(input_ids, positions, attn)


def setup_worker(config: EngineConfig, log_level: int) -> None:
    """What a worker's process needs before its loop, whichever launcher started it."""
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s tp-worker %(name)s: %(message)s"
    )
    logging.getLogger("compiled_llm").setLevel(log_level)
    # tqdm's first bar (compiling) makes a multiprocessing lock, a named semaphore this
    # process's os._exit never unlinks (then the resource tracker warns); a thread lock will do.
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    if config.device.type == "cpu":  # the ranks share the cores
        tp = config.parallel_config.tensor_parallel_size
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))


def run_worker(config: EngineConfig, init_method: str, link: Link) -> int:
    """Rank `config.parallel_config.rank`'s life, for both launchers: the start-up rank 0 does,
    then one forward per step message until told to stop (None) or the link closes. Reports
    "joining", "ready", or ("error", traceback) to rank 0; returns the exit code."""
    try:
        link.send(("joining", None))
        _init_process_group(config, init_method)
        runner = WorkerRunner(config)
        runner.initialize_kv_cache(runner.determine_num_blocks())
        runner.compile()
        link.send(("ready", None))
        while True:
            message = pickle.loads(link.recv_bytes())
            if message is None:
                return 0
            runner.execute(message)
    except EOFError:  # the engine core is gone
        return 1
    except BaseException:
        with contextlib.suppress(OSError):
            link.send(("error", traceback.format_exc()))
        return 1
    finally:
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def worker_main(
    config: EngineConfig, init_method: str, conn: Connection, parent_pid: int, log_level: int
) -> None:
    """Process entry point of a worker started by `ProcessWorkers`."""
    exit_with_parent(parent_pid)
    setup_worker(config, log_level)
    os._exit(run_worker(config, init_method, conn))
