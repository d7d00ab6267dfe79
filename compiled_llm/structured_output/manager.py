"""The engine core's side of structured outputs: grammars compiled off the step loop, one
matcher per sample, and the step's token bitmask filled on the host.

Compilation runs on one worker thread (xgrammar releases the GIL while it compiles), so a slow
grammar never stalls the step loop: the request waits in the queue until its grammar is ready
(`RequestGrammar.ready`), while others run. One `GrammarCompiler` per engine (one tokenizer),
built on first use; its cache keys compiled grammars by their spec, so a schema seen before
(or the `n` samples of one request) compiles once.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

import torch

from compiled_llm.sampling_params import SamplingParams
from compiled_llm.structured_output.validate import grammar_spec, json_options

logger = logging.getLogger(__name__)


def bitmask_width(vocab_size: int) -> int:
    """int32 words per row of a token bitmask (bit t of word t // 32 allows token t)."""
    return -(-vocab_size // 32)


class RequestGrammar:
    """One sample's grammar: the compile future, then its matcher. The matcher has accepted
    exactly the sample's output tokens, so it stays right across preemption (recompute keeps the
    tokens) and prefix-cache hits (which only concern the prompt)."""

    def __init__(self, future: Future[Any], stop_token_ids: list[int]) -> None:
        self.future = future
        self._stop_token_ids = stop_token_ids
        self.matcher: Any = None
        self.error: str | None = None  # why the grammar failed to compile or was broken

    def ready(self) -> bool:
        """True once compiled (or failed: `error` says why)."""
        if self.matcher is not None or self.error is not None:
            return True
        if not self.future.done():
            return False
        try:
            import xgrammar as xgr

            # No stop id inside the vocabulary (xgrammar refuses an empty list): the
            # tokenizer's own end-of-sequence tokens end the grammar.
            self.matcher = xgr.GrammarMatcher(
                self.future.result(), override_stop_tokens=self._stop_token_ids or None
            )
        except Exception as e:
            logger.warning("structured outputs: grammar compilation failed: %s", e)
            self.error = f"structured_outputs: the grammar failed to compile: {e}"
        return True

    def accept(self, token: int) -> bool:
        """Advance by a sampled token; False (and `error` set) when the grammar refuses it,
        which happens only when the mask allowed no token at all."""
        if self.matcher.is_terminated():
            return True
        if self.matcher.accept_token(token):
            return True
        self.error = "structured_outputs: no token could continue the grammar"
        return False

    def is_terminated(self) -> bool:
        return self.matcher is not None and bool(self.matcher.is_terminated())


class StructuredOutputManager:
    def __init__(
        self,
        tokenizer: str,
        vocab_size: int,
        pin_memory: bool,
        trust_remote_code: bool = False,
        fill_threads: int | Literal["auto"] = "auto",
    ) -> None:
        """`fill_threads`: xgrammar's threads for a batch's bitmask. On a CPU model, 1: the
        cores belong to torch's OpenMP pool, and xgrammar's idle workers spin long enough after
        a fill to slow the next forward's GEMMs, while a fill of 64 rows takes about a
        millisecond either way (docs/structured_output.md; `benchmarks/structured_output.py
        --cprofile N --fill-threads auto|1`)."""
        self.tokenizer_path = tokenizer
        self.trust_remote_code = trust_remote_code
        self.vocab_size = vocab_size
        self.pin_memory = pin_memory
        self.fill_threads = fill_threads
        self._executor: ThreadPoolExecutor | None = None  # compiles grammars
        self._compiler: Any = None
        self._lock = threading.Lock()
        self._batch: Any = None  # xgrammar's BatchGrammarMatcher, made on first use

    def grammar_for(self, params: SamplingParams) -> RequestGrammar:
        """Start compiling the request's grammar (returns at once)."""
        so = params.structured_outputs
        assert so is not None
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="grammar")
        future = self._executor.submit(self._compile, grammar_spec(so))
        stops = sorted(t for t in params.all_stop_token_ids if t < self.vocab_size)
        return RequestGrammar(future, stops)

    def _compile(self, spec: tuple[str, str, bool]) -> Any:
        kind, text, any_whitespace = spec
        compiler = self._get_compiler()
        if kind in ("json", "json_object"):
            return compiler.compile_json_schema(text, **json_options(kind, any_whitespace))
        if kind == "regex":
            return compiler.compile_regex(text)
        return compiler.compile_grammar(text)

    def _get_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                from compiled_llm.models.loader import load_tokenizer

                tokenizer = load_tokenizer(self.tokenizer_path, self.trust_remote_code)
                info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size)
                self._compiler = xgr.GrammarCompiler(info, cache_enabled=True)
            return self._compiler

    def bitmask(self, grammars: list[RequestGrammar | None]) -> torch.Tensor | None:
        """The next-token bitmask of a step's sampling rows, row i for grammars[i], as a
        [B, W] int32 host tensor (pinned on CUDA); None when no row has a grammar. Rows without
        a grammar allow everything, and so does a finished one (its step was launched before it
        ended; its token is dropped)."""
        if all(g is None for g in grammars):
            return None
        # A fresh tensor each step: torch's caching host allocator does not hand pinned memory
        # back out while a copy from it may still be in flight (and hands it out cheaply once
        # the copy is done). Its contents are stale, so every row is written below.
        width = bitmask_width(self.vocab_size)
        mask = torch.empty((len(grammars), width), dtype=torch.int32, pin_memory=self.pin_memory)
        active = []
        free = []  # rows that allow everything
        for i, g in enumerate(grammars):
            if g is not None and g.matcher is not None and not g.matcher.is_terminated():
                active.append((i, g.matcher))
            else:
                free.append(i)
        if free:
            # Through numpy, not `mask.fill_(-1)`: a torch fill of the whole buffer is a parallel
            # op whose OpenMP workers keep spinning after it and slowed xgrammar's fill threads
            # (docs/structured_output.md, "Measuring the overhead").
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
        return mask
