"""The in-process engine: input processor -> engine core -> output processor, one step at a time."""

from __future__ import annotations

import itertools
import time
from typing import Any

from compiled_llm.config import EngineConfig
from compiled_llm.engine.core import EngineCore
from compiled_llm.engine.messages import SchedulerStatsMsg
from compiled_llm.engine.output_processor import OutputProcessor
from compiled_llm.engine.processor import InputProcessor, PromptType
from compiled_llm.models.derived import EngineTokenizer
from compiled_llm.models.loader import load_engine_tokenizer, load_tokenizer
from compiled_llm.outputs import RequestOutput
from compiled_llm.sampling_params import SamplingParams


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        mc = config.model_config
        start = time.perf_counter()
        # What requests are encoded and decoded with; `tokenizer` (transformers') loads on use.
        self.engine_tokenizer = (
            None
            if mc.skip_tokenizer_init
            else load_engine_tokenizer(mc.tokenizer, mc.trust_remote_code)
        )
        tokenizer_seconds = time.perf_counter() - start
        self._tokenizer: Any = None
        self.processor = InputProcessor(config.model_config, self.engine_tokenizer)
        self.output_processor = OutputProcessor(self.engine_tokenizer)
        self.core = EngineCore(config)
        # Seconds per start stage: the tokenizer's, then the model runner's.
        self.start_seconds = {"tokenizer": tokenizer_seconds, **self.core.runner.start_seconds}
        self._ids = itertools.count()
        self.last_stats: SchedulerStatsMsg | None = None
        self.num_prompt_tokens_computed = 0  # over the engine's life: prefix hits are not counted

    @property
    def tokenizer(self) -> Any:
        """The transformers tokenizer (chat templates, and what `LLM.get_tokenizer()` returns),
        loaded on first use: a start that only generates never imports transformers."""
        if self.engine_tokenizer is None:
            return None
        if self._tokenizer is None:
            light = isinstance(self.engine_tokenizer, EngineTokenizer)
            mc = self.config.model_config
            self._tokenizer = (
                load_tokenizer(mc.tokenizer, mc.trust_remote_code)
                if light
                else self.engine_tokenizer
            )
        return self._tokenizer

    def next_request_id(self) -> str:
        return str(next(self._ids))

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        priority: int = 0,
    ) -> None:
        """Validate and queue; raises ValueError (naming the field) with nothing queued."""
        text, ids, params, core_requests = self.processor.process(
            request_id, prompt, params, priority
        )
        self.output_processor.add_request(
            request_id,
            text,
            ids,
            params,
            [r.request_id for r in core_requests],
            core_requests[0].arrival_time,
        )
        for r in core_requests:
            self.core.add_request(r)

    def abort_request(self, request_id: str) -> None:
        children = self.output_processor.child_ids(request_id)
        self.output_processor.abort(request_id)
        self.core.abort_requests(children)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests() or self.output_processor.has_unfinished()

    def step(self, final_only: bool = False) -> list[RequestOutput]:
        """One engine step: the outputs of the requests it updated (`final_only`: of those it
        finished; `current_output` gives a running request's output on demand)."""
        core_out = self.core.step()
        self.last_stats = core_out.stats
        if core_out.stats is not None:
            self.num_prompt_tokens_computed += core_out.stats.num_prompt_tokens_computed
        with self.core.profiler.stage("detokenize"):
            outputs, to_stop = self.output_processor.process_outputs(
                core_out.outputs, final_only=final_only
            )
        if to_stop:
            self.core.abort_requests(to_stop, reason="stop")
        return outputs

    def current_output(self, request_id: str) -> RequestOutput | None:
        """A running request's output so far (None if none of its tokens has come back)."""
        return self.output_processor.current_output(request_id)

    @property
    def num_free_blocks(self) -> int:
        return self.core.kv_cache.num_free_blocks

    def stats(self) -> Any:
        return self.core.scheduler.stats()
