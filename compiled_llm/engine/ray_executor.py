"""`distributed_executor_backend="ray"` (docs/tensor_parallel.md, "Multi-node with Ray"):
tensor-parallel ranks 1..N-1 as Ray actors, possibly on other hosts; rank 0 stays in the engine
core's process, as with the "mp" backend.

- Ray: the cluster this process is already connected to, else `ray.init()`, which connects to
  RAY_ADDRESS or a cluster `ray start` left running and otherwise starts a local one. Shutting
  the engine down leaves Ray as it found it (`ray.shutdown()` only after its own `ray.init()`).
- Placement: one bundle per rank, {"GPU": 1} on CUDA or {"CPU": 1} on CPU, packed; bundle 0 is
  rank 0's and is pinned to this node. On CUDA each actor uses the GPU Ray gives it (Ray sets
  its CUDA_VISIBLE_DEVICES), and rank 0 the GPU Ray reserved in bundle 0, so that no two ranks
  of this node share one.
- Per step, the same path as "mp": rank 0 pickles the step's host inputs once and sends the bytes
  to every worker, here over one ZeroMQ ROUTER socket on this node's IP (a DEALER in each actor)
  instead of a pipe; each actor runs `tp_executor.run_worker`, the loop "mp" workers run.
  torch.distributed meets at tcp://<this node's IP>:<free port>.
- Faults: each actor's long-running `run` call is an ObjectRef that fails with Ray's
  ActorDiedError when the actor dies; the driver's monitor waits on those refs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import threading
import time
import weakref
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
import zmq

from compiled_llm.config import EngineConfig, require_ray
from compiled_llm.engine.tp_executor import (
    WorkerFailed,
    free_port,
    rank_config,
    run_worker,
    setup_worker,
)

logger = logging.getLogger(__name__)

_PLACE_TIMEOUT_S = 120.0  # how long Ray may take to find resources for the placement group
_START_TIMEOUT_S = 300.0  # how long an actor may take to start (a fresh node imports torch)
_STOP_TIMEOUT_S = 10.0  # how long the actors get to leave their loop before ray.kill


class ZmqLink:
    """An actor's end of the step channel: a DEALER socket whose identity is the rank, with a
    multiprocessing pipe's `send` (reports) and `recv_bytes` (step messages)."""

    def __init__(self, address: str, rank: int) -> None:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.IDENTITY, str(rank).encode())
        self._sock.setsockopt(zmq.LINGER, 2000)  # a last report reaches rank 0 before exit
        self._sock.connect(address)

    def send(self, obj: Any) -> None:
        self._sock.send(pickle.dumps(obj))

    def recv_bytes(self) -> bytes:
        return self._sock.recv()

    def close(self) -> None:
        self._sock.close()
        self._ctx.term()


class RankActor:
    """The body of one rank's Ray actor (made remote by `RayWorkers`)."""

    def __init__(self, log_level: int) -> None:
        self.log_level = log_level

    def info(self) -> tuple[str, int, str]:
        """Its actor id, pid and node IP, for error messages."""
        import ray

        actor_id = ray.get_runtime_context().get_actor_id() or "?"
        return actor_id, os.getpid(), ray.util.get_node_ip_address()

    def run(self, config: EngineConfig, init_method: str, address: str) -> None:
        """The worker loop of tp_executor, until rank 0 says stop. If it fails (its traceback
        has gone to rank 0) the actor's process exits, as an "mp" worker's does: that closes
        its gloo/NCCL connections, so rank 0's next collective fails instead of waiting for
        the collective timeout."""
        setup_worker(config, self.log_level)
        link = ZmqLink(address, config.parallel_config.rank)
        try:
            code = run_worker(config, init_method, link)
        finally:
            link.close()  # waits (LINGER) for the last report to leave
        if code:
            os._exit(code)


def _gpu_uuid() -> str:
    """The UUID of the one GPU a Ray task with num_gpus=1 sees."""
    return str(torch.cuda.get_device_properties(0).uuid)


@dataclass
class _Cluster:
    """What `RayWorkers` holds in Ray and ZeroMQ, apart from it so a finalizer can stop it."""

    ray: ModuleType
    owns_ray: bool  # this engine called ray.init()
    stopping: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)  # the socket's users
    ray_lock: threading.Lock = field(default_factory=threading.Lock)  # ray.wait vs shutdown
    pg: Any = None
    actors: list[Any] = field(default_factory=list)
    runs: list[Any] = field(default_factory=list)  # each actor's `run` ObjectRef
    ctx: zmq.Context | None = None
    sock: zmq.Socket | None = None
    stopped: bool = False


def _stop(c: _Cluster) -> None:
    """Ask the actors to leave their loop, then kill them, remove the placement group, close
    the socket and (if this engine started it) disconnect from Ray."""
    if c.stopped:
        return
    c.stopped = True
    c.stopping.set()
    ray = c.ray
    if c.sock is not None:
        with c.lock:
            for rank in range(1, len(c.actors) + 1):
                with contextlib.suppress(zmq.ZMQError):
                    c.sock.send_multipart([str(rank).encode(), pickle.dumps(None)], zmq.NOBLOCK)
    with contextlib.suppress(Exception):
        if c.runs:
            ray.wait(c.runs, num_returns=len(c.runs), timeout=_STOP_TIMEOUT_S)
    for actor in c.actors:
        with contextlib.suppress(Exception):
            ray.kill(actor)
    with contextlib.suppress(Exception):
        if c.runs:  # the kills have landed
            ray.wait(c.runs, num_returns=len(c.runs), timeout=_STOP_TIMEOUT_S)
    if c.pg is not None:
        from ray.util.placement_group import remove_placement_group

        with contextlib.suppress(Exception):
            remove_placement_group(c.pg)
    if c.sock is not None:
        with c.lock:
            c.sock.close(linger=0)
    if c.ctx is not None:
        c.ctx.term()
    if c.owns_ray:
        with c.ray_lock, contextlib.suppress(Exception):
            ray.shutdown()


class RayWorkers:
    """Ranks 1..N-1 as Ray actors (tp_executor.Workers); `driver_config` is rank 0's config (on
    CUDA with the GPU Ray reserved for it)."""

    def __init__(self, config: EngineConfig) -> None:
        ray = require_ray()
        self._c = _Cluster(ray=ray, owns_ray=not ray.is_initialized())
        self.stopping = self._c.stopping
        self._finalizer = weakref.finalize(self, _stop, self._c)
        self.world = config.parallel_config.tensor_parallel_size
        self.info: list[tuple[str, int, str]] = []  # each actor's (id, pid, node IP)
        self._error: str | None = None  # the first error an actor reported
        self._inbox: dict[int, list[str]] = {}  # report kinds per rank, not yet expected
        try:
            if self._c.owns_ray:
                ray.init()  # RAY_ADDRESS, a running cluster, else a local one
            self._start(config)
        except BaseException:
            self.stop()
            raise

    def _start(self, config: EngineConfig) -> None:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        ray, c = self._c.ray, self._c
        cuda = config.device.type == "cuda"
        ip = ray.util.get_node_ip_address()
        unit = {"GPU": 1.0} if cuda else {"CPU": 1.0}
        bundles = [{**unit, f"node:{ip}": 0.001}] + [dict(unit) for _ in range(1, self.world)]
        c.pg = placement_group(bundles, strategy="PACK")
        try:
            ray.get(c.pg.ready(), timeout=_PLACE_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(
                f"tensor_parallel_size={self.world} with Ray: no room for {self.world} bundles "
                f"of {unit} (one per rank, the first on this node, {ip}) within "
                f"{_PLACE_TIMEOUT_S:.0f} s; the cluster has {ray.cluster_resources()}"
            ) from None

        def in_bundle(index: int) -> PlacementGroupSchedulingStrategy:
            return PlacementGroupSchedulingStrategy(c.pg, placement_group_bundle_index=index)

        self.driver_config = config
        if cuda:
            self.driver_config = rank_config(config, 0, self._rank0_gpu(in_bundle(0), config))
        c.ctx = zmq.Context()
        c.sock = c.ctx.socket(zmq.ROUTER)
        c.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a gone actor fails, not drops
        address = f"tcp://{ip}:{c.sock.bind_to_random_port(f'tcp://{ip}')}"
        self.init_method = f"tcp://{ip}:{free_port('')}"
        level = logging.getLogger("compiled_llm").getEffectiveLevel()
        actor_class = ray.remote(RankActor)
        for rank in range(1, self.world):
            actor = actor_class.options(
                num_cpus=0 if cuda else 1,
                num_gpus=1 if cuda else 0,
                scheduling_strategy=in_bundle(rank),
            ).remote(level)
            c.actors.append(actor)
        for rank, actor in enumerate(c.actors, start=1):
            try:
                self.info.append(ray.get(actor.info.remote(), timeout=_START_TIMEOUT_S))
            except Exception as e:
                raise WorkerFailed(
                    f"tensor-parallel worker rank {rank}: its Ray actor did not start: "
                    f"{type(e).__name__}: {e}"
                ) from None
        # In the actor, its one visible GPU (Ray's CUDA_VISIBLE_DEVICES) is cuda:0.
        device = torch.device("cuda", 0) if cuda else None
        c.runs = [
            actor.run.remote(rank_config(config, rank, device), self.init_method, address)
            for rank, actor in enumerate(c.actors, start=1)
        ]

    def _rank0_gpu(self, strategy: Any, config: EngineConfig) -> torch.device:
        """The GPU Ray reserved in bundle 0 (on this node), as this process numbers it: found
        by its UUID, which does not depend on either process's CUDA_VISIBLE_DEVICES."""
        ray = self._c.ray
        remote = ray.remote(num_gpus=1, num_cpus=0)(_gpu_uuid)
        uuid = ray.get(remote.options(scheduling_strategy=strategy).remote())
        ours = [
            str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())
        ]
        if uuid not in ours:
            raise RuntimeError(
                f"Ray reserved GPU {uuid} of this node for tensor-parallel rank 0, which the "
                "engine's process does not see (its CUDA_VISIBLE_DEVICES hides it)"
            )
        device = torch.device("cuda", ours.index(uuid))
        if config.device.index not in (None, device.index):
            logger.warning(
                "rank 0 runs on %s, the GPU Ray reserved for it, not %s", device, config.device
            )
        return device

    # the tp_executor.Workers protocol ---------------------------------------------------------
    def send(self, payload: bytes) -> None:
        c = self._c
        assert c.sock is not None
        with c.lock:
            try:
                for rank in range(1, self.world):
                    c.sock.send_multipart([str(rank).encode(), payload])
            except zmq.ZMQError as e:
                raise ConnectionError(f"tensor-parallel rank {rank} unreachable: {e}") from e

    def _who(self, rank: int) -> str:
        if rank - 1 < len(self.info):
            actor_id, pid, ip = self.info[rank - 1]
            return f"rank {rank} (Ray actor {actor_id}, pid {pid} on {ip})"
        return f"rank {rank} (Ray actor)"

    def _drain(self, wait_s: float) -> None:
        """Read the actors' reports that are there, waiting up to `wait_s` for the first."""
        c = self._c
        assert c.sock is not None
        with c.lock:
            if c.stopped or not c.sock.poll(int(wait_s * 1000)):
                return
            while c.sock.poll(0):
                ident, payload = c.sock.recv_multipart()
                rank = int(ident)
                kind, detail = pickle.loads(payload)
                if kind == "error" and self._error is None:
                    self._error = f"{self._who(rank)}: {detail}"
                self._inbox.setdefault(rank, []).append(kind)

    def expect(self, kind: str, timeout: float, stage: str) -> None:
        deadline = time.monotonic() + timeout
        for rank in range(1, self.world):
            while True:
                left = deadline - time.monotonic()
                self._drain(min(max(left, 0.0), 0.2))
                if self._error is not None:
                    raise WorkerFailed(f"tensor-parallel worker failed {stage}: {self._error}")
                inbox = self._inbox.setdefault(rank, [])
                if kind in inbox:
                    inbox.remove(kind)
                    break
                gone = self.dead()
                if gone is not None:
                    raise WorkerFailed(f"tensor-parallel worker {gone[1]} {stage}")
                if left <= 0:
                    raise WorkerFailed(
                        f"tensor-parallel worker {self._who(rank)} sent nothing for "
                        f"{timeout:.0f} s {stage}"
                    )

    def reported_error(self) -> str | None:
        with contextlib.suppress(zmq.ZMQError):
            self._drain(0.0)
        return self._error

    def _ended(self, ref: Any) -> tuple[int, str]:
        rank = self._c.runs.index(ref) + 1
        try:
            self._c.ray.get(ref, timeout=5.0)
        except self._c.ray.exceptions.RayActorError as e:  # ActorDiedError: the actor is gone
            return rank, f"{self._who(rank)} died: {type(e).__name__}: {e}"
        except Exception as e:  # its loop raised (a failed start-up or step)
            return rank, f"{self._who(rank)} failed: {type(e).__name__}: {e}"
        return rank, f"{self._who(rank)} left its loop"

    def dead(self) -> tuple[int, str] | None:
        runs = self._c.runs
        if not runs or self._c.stopped:
            return None
        ready, _ = self._c.ray.wait(runs, num_returns=len(runs), timeout=0)
        return self._ended(ready[0]) if ready else None

    def wait_for_death(self) -> tuple[int, str] | None:
        c = self._c
        while not c.stopping.is_set() and c.runs:
            with c.ray_lock:
                if c.stopped:
                    return None
                ready, _ = c.ray.wait(c.runs, num_returns=1, timeout=1.0)
            if ready:
                return None if c.stopping.is_set() else self._ended(ready[0])
        return None

    def stop(self) -> None:
        self._finalizer()
