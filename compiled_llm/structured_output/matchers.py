"""The grammar side of structured outputs: compile grammars, keep one xgrammar matcher per
sample, accept the sampled tokens and fill the next step's token bitmask.

`Matchers` does the work; where it runs is the manager's choice (manager.py): in the engine
core's process, or in a process of its own (`serve`), so that its accept and fill, which hold
the GIL, run beside the step loop's Python instead of in it. Either way it is driven by the same
messages, tuples whose first item names them:

  to it:   ("add", key, spec, stop_token_ids)   compile on a worker thread, then make the matcher
           ("remove", keys)                     forget finished samples
           ("step", seq, accepts, rows, buffer, drafts)
                                                accept each (key, tokens), then fill bitmask rows
                                                for `rows` (a key, or None: all allowed) into
                                                buffer `buffer`: one per entry, or with `drafts`
                                                1 + len(drafts[i]) for entry i
  from it: ("compiled", key, error, stop_token_ids)  error is None when the matcher is ready
           ("step", seq, errors)                     {key: why} for samples it refused a token of
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any, Literal

import numpy as np
import torch

logger = logging.getLogger(__name__)

Message = tuple[Any, ...]
GrammarSpec = tuple[str, str, bool]  # kind, text, any_whitespace (validate.grammar_spec)
REFUSED = "structured_outputs: no token could continue the grammar"


def num_mask_rows(rows: list[int | None], drafts: list[list[int]] | None) -> int:
    """Bitmask rows of a step: one per entry of `rows`, plus one per draft it verifies."""
    return len(rows) + (sum(map(len, drafts)) if drafts is not None else 0)


class Matchers:
    def __init__(
        self,
        tokenizer: str,
        vocab_size: int,
        trust_remote_code: bool,
        fill_threads: int | Literal["auto"],
        buffers: torch.Tensor,
        notify: Callable[[Message], None],
    ) -> None:
        """`buffers`: [buffers, rows, words] int32 bitmask buffers (steps alternate between
        them); `notify` sends a message back (it is called from the compile thread too)."""
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.trust_remote_code = trust_remote_code
        self.fill_threads = fill_threads
        self.buffers = buffers
        self.notify = notify
        self._matchers: dict[int, Any] = {}
        self._compiling: set[int] = set()
        self._removed: set[int] = set()  # removed while compiling
        self._lock = threading.Lock()
        self._compiler: Any = None
        self._batch: Any = None  # xgrammar's BatchGrammarMatcher, made on first use
        # One compile thread: xgrammar releases the GIL while it compiles.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="grammar")

    def handle(self, message: Message) -> None:
        op = message[0]
        if op == "add":
            with self._lock:
                self._compiling.add(message[1])
            self._executor.submit(self._compile, *message[1:])
        elif op == "remove":
            with self._lock:
                for key in message[1]:
                    self._matchers.pop(key, None)
                    if key in self._compiling:
                        self._removed.add(key)
        elif op == "step":
            _, seq, accepts, rows, buffer, drafts = message
            mask = self.buffers[buffer, : num_mask_rows(rows, drafts)]
            errors = self.step(accepts, rows, mask, drafts)
            self.notify(("step", seq, errors))
        else:
            raise ValueError(f"unknown grammar message {op!r}")

    def _compile(self, key: int, spec: GrammarSpec, stop_token_ids: list[int]) -> None:
        matcher = error = None
        try:
            import xgrammar as xgr

            # No stop id inside the vocabulary (xgrammar refuses an empty list): the
            # tokenizer's own end-of-sequence tokens end the grammar.
            matcher = xgr.GrammarMatcher(
                self._compile_spec(spec), override_stop_tokens=stop_token_ids or None
            )
        except Exception as e:
            logger.warning("structured outputs: grammar compilation failed: %s", e)
            error = f"structured_outputs: the grammar failed to compile: {e}"
        with self._lock:
            self._compiling.discard(key)
            if key in self._removed:  # its request ended while it compiled
                self._removed.discard(key)
                return
            if matcher is not None:
                self._matchers[key] = matcher
        stops = list(matcher.stop_token_ids) if matcher is not None else []
        self.notify(("compiled", key, error, stops))

    def _compile_spec(self, spec: GrammarSpec) -> Any:
        from compiled_llm.structured_output.validate import json_options

        kind, text, any_whitespace = spec
        compiler = self._get_compiler()
        if kind in ("json", "json_object"):
            return compiler.compile_json_schema(text, **json_options(kind, any_whitespace))
        if kind == "regex":
            return compiler.compile_regex(text)
        return compiler.compile_grammar(text)

    def _get_compiler(self) -> Any:
        # One compiler per tokenizer, made on first use; its cache keys compiled grammars by
        # their spec, so a schema seen before (or the n samples of one request) compiles once.
        if self._compiler is None:
            import xgrammar as xgr

            from compiled_llm.models.loader import load_tokenizer

            tokenizer = load_tokenizer(self.tokenizer, self.trust_remote_code)
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size)
            self._compiler = xgr.GrammarCompiler(info, cache_enabled=True)
        return self._compiler

    def step(
        self,
        accepts: list[tuple[int, list[int]]],
        rows: list[int | None],
        mask: torch.Tensor,
        drafts: list[list[int]] | None = None,
    ) -> dict[int, str]:
        """Advance each sample by its new tokens, then fill `mask`: row i for rows[i], or with
        `drafts` (speculative decoding), 1 + len(drafts[i]) rows for rows[i], one per position
        its step verifies (after 0, 1, ... of its drafts). A sample whose grammar has ended
        ignores further tokens (its request is finishing); one whose grammar refuses a token
        (possible only when its mask allowed none) is reported and allows everything from then
        on, until it is removed."""
        errors: dict[int, str] = {}
        matchers = self._matchers
        for key, tokens in accepts:
            matcher = matchers.get(key)
            if matcher is None:
                continue
            for token in tokens:
                if matcher.is_terminated():
                    break
                if not matcher.accept_token(token):
                    errors[key] = REFUSED
                    break
        active = []
        free = []  # rows that allow everything
        for i, row in enumerate(rows):
            matcher = None if row is None or row in errors else matchers.get(row)
            if matcher is not None and not matcher.is_terminated():
                active.append((i, matcher))
            else:
                free.append(i)
        if drafts is not None:
            self._fill_with_drafts(active, free, drafts, mask)
            return errors
        if free:
            # Through numpy, not `mask[free] = -1`: a torch write of a large part of the buffer
            # runs on torch's OpenMP workers, whose spinning after it slowed xgrammar's fill
            # threads (docs/structured_output.md, "Measuring the overhead").
            mask.numpy()[free] = -1
        # xgrammar writes every word of each row it fills (tests/structured_output/test_bitmask.py
        # checks it on a buffer of garbage).
        if len(active) == 1:
            active[0][1].fill_next_token_bitmask(mask, active[0][0])
        elif active:  # xgrammar fills the rows on its own threads
            if self._batch is None:
                import xgrammar as xgr

                self._batch = xgr.BatchGrammarMatcher(self.fill_threads)
            self._batch.batch_fill_next_token_bitmask(
                [m for _, m in active], mask, indices=[i for i, _ in active]
            )
        return errors

    @staticmethod
    def _fill_with_drafts(
        active: list[tuple[int, Any]], free: list[int], drafts: list[list[int]], mask: torch.Tensor
    ) -> None:
        """Rows of a step that verifies drafts: each active sample's matcher fills its first
        row, accepts its first draft, fills the next row, and so on, then rolls the drafts
        back (they are only kept once verified, and come back as accepted tokens). Rows after a
        draft the grammar refuses, or after one that ends it, allow everything: the target's
        token at the refused position is masked, so it never equals that draft, and the
        verification stops there (or at the end)."""
        first = [0]
        for d in drafts:
            first.append(first[-1] + 1 + len(d))
        words = mask.numpy()
        for i in free:
            words[first[i] : first[i + 1]] = -1
        for i, matcher in active:
            row, end = first[i], first[i + 1]
            matcher.fill_next_token_bitmask(mask, row)
            accepted = 0
            for token in drafts[i]:
                row += 1
                if not matcher.accept_token(token):
                    break
                accepted += 1
                if matcher.is_terminated():
                    break
                matcher.fill_next_token_bitmask(mask, row)
            else:
                row += 1
            words[row:end] = -1
            if accepted:
                matcher.rollback(accepted)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def serve(spec: dict[str, Any]) -> None:
    """The grammar process (grammar_process.py, started by manager._Process with `spec`): handle
    messages until told to stop or the engine is gone."""
    from compiled_llm.child_process import exit_with_parent

    exit_with_parent(spec["parent_pid"])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s grammar %(name)s: %(message)s")
    torch.set_num_threads(1)  # nothing here is a torch op worth threads
    conn = Connection(spec["conn"])
    shape = tuple(spec["shape"])
    shared = mmap.mmap(spec["memory"], int(np.prod(shape)) * 4)
    os.close(spec["memory"])
    buffers = torch.from_numpy(np.frombuffer(shared, dtype=np.int32).reshape(shape))
    sending = threading.Lock()  # replies and the compile thread's notices share the socket

    def send(message: Message) -> None:
        with sending:
            conn.send(message)

    matchers = Matchers(
        spec["tokenizer"],
        spec["vocab_size"],
        spec["trust_remote_code"],
        spec["fill_threads"],
        buffers,
        send,
    )
    code = 0
    try:
        while True:
            message = conn.recv()
            if message[0] == "stop":
                break
            matchers.handle(message)
    except (EOFError, OSError):
        pass  # the engine closed its end
    except BaseException:
        logger.exception("the grammar process failed")
        code = 1
    os._exit(code)  # no teardown: the mapping and xgrammar's threads end with the process
