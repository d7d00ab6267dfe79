"""The engine core's side of structured outputs: a handle per sample (`RequestGrammar`) and
the manager that drives the grammar matchers (matchers.py) with messages.

Compilation runs on the matchers' worker thread, so a slow grammar never stalls the step loop:
the request waits in the queue until its grammar is ready (`RequestGrammar.ready`), while
others run. The step loop records each sample's new tokens on its handle; `prefetch` sends them
with the rows of the next step's bitmask, and `bitmask` waits for it. With the matchers in a
process of their own (`matchers="process"`, the default on CUDA), accepting and filling, which
hold the GIL, run while the step loop schedules the next step and builds its inputs; inline they
run in `prefetch`, on the step loop's thread.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import mmap
import os
import socket
import subprocess
import sys
import threading
import weakref
from multiprocessing.connection import Connection
from typing import Literal

import numpy as np
import torch

from compiled_llm.sampling_params import SamplingParams
from compiled_llm.structured_output.matchers import Matchers, Message, num_mask_rows
from compiled_llm.structured_output.validate import grammar_spec

logger = logging.getLogger(__name__)


# What Matchers is made with besides its buffers: tokenizer, vocabulary size, trust_remote_code,
# fill threads.
MatcherArgs = tuple[str, int, bool, int | Literal["auto"]]


def bitmask_width(vocab_size: int) -> int:
    """int32 words per row of a token bitmask (bit t of word t // 32 allows token t)."""
    return -(-vocab_size // 32)


class RequestGrammar:
    """One sample's grammar as the step loop sees it: compiling, ready or failed (`error`), and
    the sampled tokens its matcher has not been sent yet. The matcher accepts exactly the
    sample's output tokens, so it stays right across preemption (recompute keeps the tokens) and
    prefix-cache hits (which only concern the prompt)."""

    def __init__(self, manager: StructuredOutputManager, key: int) -> None:
        self._manager = manager
        self.key = key
        self.compiled = False
        self.error: str | None = None  # why the grammar failed to compile or was broken
        self.stop_token_ids: frozenset[int] = frozenset()  # the matcher's, once compiled
        self.pending: list[int] = []  # accepted here, not yet by the matcher
        self._ended = False

    def ready(self) -> bool:
        """True once compiled (or failed: `error` says why)."""
        if not self.compiled and self.error is None:
            self._manager.poll()
        return self.compiled or self.error is not None

    def accept(self, token: int) -> bool:
        """Take a sampled token; False if the matcher has refused one (`error` says so). The
        mask allows a stop token only where the grammar may end, so one ends it here at once;
        the matcher checks every token when it gets them, with the next bitmask."""
        if self.error is not None:
            return False
        if self._ended:
            return True
        if not self.pending:
            self._manager.dirty.append(self)
        self.pending.append(token)
        self._ended = token in self.stop_token_ids
        return True

    def is_terminated(self) -> bool:
        return self._ended

    def release(self) -> None:
        """The sample has finished: its matcher goes."""
        self._manager.release(self)


class StructuredOutputManager:
    def __init__(
        self,
        tokenizer: str,
        vocab_size: int,
        max_rows: int,
        pin_memory: bool,
        trust_remote_code: bool = False,
        fill_threads: int | Literal["auto"] = "auto",
        matchers: str = "inline",
    ) -> None:
        """`max_rows`: the most sampling rows a step has (drafts' rows included).
        `fill_threads`: xgrammar's threads for a batch's bitmask. On a CPU model, 1: the cores
        belong to torch's OpenMP pool, and xgrammar's idle workers spin long enough after a fill
        to slow the next forward's GEMMs, while a fill of 64 rows takes about a millisecond
        either way (docs/structured_output.md; `benchmarks/structured_output.py --cprofile N
        --fill-threads auto|1`). `matchers`: "inline" or "process" (StructuredOutputsConfig);
        the process starts with the manager, so the first request does not wait for it."""
        self.max_rows = max_rows
        width = bitmask_width(vocab_size)
        self._args: MatcherArgs = (
            tokenizer,
            vocab_size,
            trust_remote_code,
            fill_threads,
        )
        self._grammars: dict[int, RequestGrammar] = {}  # compiling or running
        self._keys = itertools.count()
        self.dirty: list[RequestGrammar] = []  # with pending tokens
        self._seq = itertools.count(1)
        # The step whose bitmask was asked for: (seq, rows, drafts, buffer, number of mask
        # rows); replies' errors by seq.
        self._in_flight: tuple[int, list[int | None], list[list[int]] | None, int, int] | None = (
            None
        )
        self._replies: dict[int, dict[int, str]] = {}
        self._channel: _Inline | _Process
        if matchers == "process":
            self._channel = _Process(self._args, (2, max_rows, width))
        else:
            shape = (2, max_rows, width)
            buffers = torch.empty(shape, dtype=torch.int32, pin_memory=pin_memory)
            self._channel = _Inline(self._args, buffers)
        self.buffers = self._channel.buffers

    def grammar_for(self, params: SamplingParams) -> RequestGrammar:
        """Start compiling a sample's grammar (returns at once)."""
        so = params.structured_outputs
        assert so is not None
        key = next(self._keys)
        grammar = RequestGrammar(self, key)
        self._grammars[key] = grammar
        stops = sorted(t for t in params.all_stop_token_ids if t < self._args[1])
        self._channel.send(("add", key, grammar_spec(so), stops))
        return grammar

    def release(self, grammar: RequestGrammar) -> None:
        if self._grammars.pop(grammar.key, None) is not None:
            grammar.pending.clear()
            self._channel.send(("remove", [grammar.key]))

    # --- messages -------------------------------------------------------------------------------
    def _dispatch(self, message: Message) -> None:
        if message[0] == "compiled":
            _, key, error, stop_token_ids = message
            grammar = self._grammars.get(key)
            if grammar is not None:
                grammar.error = error
                grammar.stop_token_ids = frozenset(stop_token_ids)
                grammar.compiled = error is None
        else:
            _, seq, errors = message
            self._replies[seq] = errors

    def poll(self) -> None:
        """Take the messages that have arrived (compiled grammars), without waiting."""
        while (message := self._channel.recv(0)) is not None:
            self._dispatch(message)

    def wait_compiled(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for a message (a grammar compiled), then poll."""
        message = self._channel.recv(timeout)
        if message is not None:
            self._dispatch(message)
            self.poll()

    # --- steps ----------------------------------------------------------------------------------
    def prefetch(
        self, grammars: list[RequestGrammar | None], drafts: list[list[int]] | None = None
    ) -> None:
        """Send the samples' new tokens and ask for the bitmask of a step's sampling rows:
        for grammars[i], one row, or 1 + len(drafts[i]) when the step verifies drafts; `bitmask`
        waits for it. Nothing for a step without grammar rows."""
        if self._in_flight is None and any(g is not None for g in grammars):
            self._ask(*self._layout(grammars, drafts))

    def bitmask(
        self, grammars: list[RequestGrammar | None], drafts: list[list[int]] | None = None
    ) -> torch.Tensor | None:
        """The next-token bitmask of a step's sampling rows (as `prefetch` lays them out) as a
        [rows, W] int32 host tensor (a view of one of two buffers, which steps alternate: the
        step's sampling has copied it before the step after next refills it); None when no row
        has a grammar. Rows without a grammar allow everything, and so does a finished one (its
        step was launched before it ended; its token is dropped). A sample whose matcher
        refused a token gets `error` set; the caller ends its request."""
        if all(g is None for g in grammars):
            return None
        rows, drafts = self._layout(grammars, drafts)
        if self._in_flight is not None and self._in_flight[1:3] != (rows, drafts):
            self._wait(self._in_flight[0])  # asked for other rows: drop it, ask again
            self._in_flight = None
        if self._in_flight is None:
            self._ask(rows, drafts)
        assert self._in_flight is not None
        seq, _, _, buffer, num_rows = self._in_flight
        self._in_flight = None
        for key, why in self._wait(seq).items():
            grammar = self._grammars.get(key)
            if grammar is not None:
                grammar.error = why
        return self.buffers[buffer, :num_rows]

    @staticmethod
    def _layout(
        grammars: list[RequestGrammar | None], drafts: list[list[int]] | None
    ) -> tuple[list[int | None], list[list[int]] | None]:
        """The step message's rows (a key, or None: all allowed) and drafts (None without any)."""
        rows = [None if g is None or g.error is not None else g.key for g in grammars]
        return rows, drafts if drafts is not None and any(drafts) else None

    def _ask(self, rows: list[int | None], drafts: list[list[int]] | None) -> None:
        num_rows = num_mask_rows(rows, drafts)
        if num_rows > self.max_rows:
            raise ValueError(f"{num_rows} sampling rows exceed max_rows={self.max_rows}")
        accepts = []
        for g in self.dirty:
            if g.pending:
                accepts.append((g.key, g.pending))
                g.pending = []
        self.dirty.clear()
        seq = next(self._seq)
        buffer = seq % 2
        self._in_flight = (seq, rows, drafts, buffer, num_rows)
        self._channel.send(("step", seq, accepts, rows, buffer, drafts))

    def _wait(self, seq: int) -> dict[int, str]:
        while seq not in self._replies:
            message = self._channel.recv(None)
            assert message is not None
            self._dispatch(message)
        return self._replies.pop(seq)

    def shutdown(self) -> None:
        self._channel.close()


class _Inline:
    """The matchers in this process: a message is handled when it is sent; replies and the
    compile thread's notices queue up for `recv`."""

    def __init__(self, args: MatcherArgs, buffers: torch.Tensor) -> None:
        self.buffers = buffers
        self._inbox: collections.deque[Message] = collections.deque()
        self._arrived = threading.Condition()
        self.matchers = Matchers(*args, buffers, self._put)

    def _put(self, message: Message) -> None:
        with self._arrived:
            self._inbox.append(message)
            self._arrived.notify()

    def send(self, message: Message) -> None:
        self.matchers.handle(message)

    def recv(self, timeout: float | None) -> Message | None:
        with self._arrived:
            if not self._inbox and timeout != 0:
                self._arrived.wait(timeout)
            return self._inbox.popleft() if self._inbox else None

    def close(self) -> None:
        self.matchers.close()


class _Process:
    """The matchers in a process of their own (`python -m
    compiled_llm.structured_output.grammar_process`), over a socket; bitmasks come back in
    memory both map (an anonymous file: no name to clean up, gone when both have closed it).
    Started as a fresh interpreter with the two descriptors passed down, not through
    multiprocessing, whose spawn would re-run the user's main module (a script that makes an
    `LLM` at top level would make another in the child). The process exits when the engine's is
    gone."""

    def __init__(self, args: MatcherArgs, shape: tuple[int, int, int]) -> None:
        size = int(np.prod(shape)) * 4
        memory = os.memfd_create("compiled-llm-bitmask")
        ours, theirs = socket.socketpair()
        child = theirs.detach()
        try:
            os.ftruncate(memory, size)
            self._mmap = mmap.mmap(memory, size)
            tokenizer, vocab_size, trust_remote_code, fill_threads = args
            spec = {
                "conn": child,
                "memory": memory,
                "shape": shape,
                "tokenizer": tokenizer,
                "vocab_size": vocab_size,
                "trust_remote_code": trust_remote_code,
                "fill_threads": fill_threads,
                "parent_pid": os.getpid(),
            }
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "compiled_llm.structured_output.grammar_process",
                    json.dumps(spec),
                ],
                pass_fds=(child, memory),
            )
        finally:
            os.close(child)
            os.close(memory)
        self._conn = Connection(ours.detach())
        self.buffers = torch.from_numpy(np.frombuffer(self._mmap, dtype=np.int32).reshape(shape))
        self._finalizer = weakref.finalize(self, _stop, self._proc, self._conn)

    def send(self, message: Message) -> None:
        try:
            self._conn.send(message)
        except OSError as e:
            raise self._gone() from e

    def recv(self, timeout: float | None) -> Message | None:
        try:
            if not self._conn.poll(timeout):
                return None
            return self._conn.recv()
        except (EOFError, OSError) as e:
            raise self._gone() from e

    def _gone(self) -> RuntimeError:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(1)
        return RuntimeError(
            f"the structured outputs' grammar process exited (exit code {self._proc.returncode})"
        )

    def close(self) -> None:
        self._finalizer()


def _stop(proc: subprocess.Popen[bytes], conn: Connection) -> None:
    with contextlib.suppress(OSError):
        conn.send(("stop",))
    try:
        proc.wait(2)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(1)
    conn.close()
