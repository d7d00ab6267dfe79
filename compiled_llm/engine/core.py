"""The engine core: scheduler + model runner, driven one step at a time.

It knows token ids only; tokenization, detokenization and stop strings live in the frontend.
The same class runs in-process (`LLM`) and in its own process behind ZeroMQ (the server).
"""

from __future__ import annotations

import logging
import time

from compiled_llm.config import EngineConfig
from compiled_llm.engine.draft_proposer import draft_proposer
from compiled_llm.engine.messages import (
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    SchedulerStatsMsg,
    SpecDecodeStatsMsg,
)
from compiled_llm.engine.model_runner import (
    LaunchedStep,
    ModelRunner,
    ModelRunnerOutput,
    StepHandle,
)
from compiled_llm.engine.scheduler import Scheduler, SchedulerOutput
from compiled_llm.engine.tp_executor import create_model_runner
from compiled_llm.kv_cache.kv_cache_manager import KVCacheManager
from compiled_llm.profiler import Profiler
from compiled_llm.request import Request, RequestStatus
from compiled_llm.sampling_params import INT64_MAX, INT64_MIN
from compiled_llm.spec_decode.decoder import SpeculativeDecoder
from compiled_llm.structured_output.manager import StructuredOutputManager

logger = logging.getLogger(__name__)

_FINISH_STATUS = {
    "stop": RequestStatus.FINISHED_STOPPED,
    "length": RequestStatus.FINISHED_LENGTH,
    "abort": RequestStatus.FINISHED_ABORTED,
}


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        obs = config.observability_config
        self.profiler = Profiler(obs.profile_dir, obs.nvtx)
        self.runner: ModelRunner = create_model_runner(config, self.profiler)
        num_blocks = self.runner.determine_num_blocks()
        self.runner.initialize_kv_cache(num_blocks)
        self.runner.compile()
        self.num_blocks = num_blocks
        self.kv_cache = KVCacheManager(
            num_blocks, config.cache_config.block_size, config.cache_config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            config.scheduler_config, self.kv_cache, config.speculative_config
        )
        spec = config.speculative_config
        self.spec = (
            SpeculativeDecoder(spec, draft_proposer(self.runner, self.kv_cache)) if spec else None
        )
        # Speculation counters of the results read since the last outputs (for /metrics).
        self._spec_stats = SpecDecodeStatsMsg.empty(spec.num_speculative_tokens if spec else 0)
        self.async_scheduling = config.scheduler_config.async_scheduling
        self._inflight: StepHandle | None = None  # sampled, results not read yet
        self._unsampled: LaunchedStep | None = None  # forward launched, sampling waits a call
        mc = config.model_config
        self.structured = StructuredOutputManager(
            mc.tokenizer,
            int(mc.hf_config.vocab_size),
            max_rows=config.scheduler_config.max_num_seqs
            * (1 + (spec.num_speculative_tokens if spec else 0)),
            pin_memory=config.device.type == "cuda",
            trust_remote_code=mc.trust_remote_code,
            fill_threads="auto" if config.device.type == "cuda" else 1,
            # without a tokenizer no request has a grammar: no process for nothing
            matchers="inline"
            if mc.skip_tokenizer_init
            else config.structured_outputs_config.matchers,
        )
        logger.info(
            "KV cache: %d blocks of %d tokens (%d tokens, %s)",
            num_blocks,
            config.cache_config.block_size,
            num_blocks * config.cache_config.block_size,
            str(mc.kv_cache_dtype).removeprefix("torch."),
        )

    # --- requests -------------------------------------------------------------------------------
    def add_request(self, req: EngineCoreRequest) -> None:
        """Queue a request; ValueError (and nothing queued) for one this core cannot run. The
        frontend validates first; this is the backstop that keeps one bad request from reaching
        the step loop, where it would take every other request down with it. (Its
        SamplingParams validated themselves when they were built or decoded.)"""
        if req.request_id in self.scheduler.requests:
            raise ValueError(f"request_id {req.request_id!r} is already running")
        self._check(req)
        params = req.sampling_params
        request = Request(
            request_id=req.request_id,
            prompt_token_ids=list(req.prompt_token_ids),
            sampling_params=params,
            max_tokens=req.max_tokens,
            sampling_seed=req.sampling_seed,
            priority=req.priority,
            arrival_time=req.arrival_time,
        )
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None] * len(request.prompt_token_ids)
        if params.structured_outputs is not None:
            request.grammar = self.structured.grammar_for(params)  # compiles on its thread
        if self.spec is not None:
            request.spec = self.spec.new_state()
        self.scheduler.add_request(request)

    def _check(self, req: EngineCoreRequest) -> None:
        mc = self.config.model_config
        vocab = int(mc.hf_config.vocab_size)
        ids = req.prompt_token_ids
        if not ids or not all(0 <= t < vocab for t in ids):
            raise ValueError(f"prompt_token_ids must be 1+ ids in [0, {vocab})")
        if not 1 <= req.max_tokens <= mc.max_model_len - len(ids):
            raise ValueError(f"max_tokens={req.max_tokens} does not fit max_model_len")
        if not 0 <= req.sampling_seed <= INT64_MAX:
            raise ValueError(f"sampling_seed={req.sampling_seed} is outside [0, 2**63)")
        if not INT64_MIN <= req.priority <= INT64_MAX:
            raise ValueError(f"priority={req.priority} does not fit 64 bits")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(req.sampling_params, name)
            if k is not None and k > vocab:
                raise ValueError(f"{name}={k} exceeds the vocabulary ({vocab} tokens)")
        if req.sampling_params.structured_outputs is not None and mc.skip_tokenizer_init:
            raise ValueError("structured_outputs needs a tokenizer (skip_tokenizer_init is set)")

    def abort_requests(self, request_ids: list[str], reason: str = "abort") -> None:
        """Finish requests now (client gone, stop string seen) and free their KV blocks. The
        frontend asked for it, so no output is sent for them."""
        for request_id in request_ids:
            self.scheduler.finish(request_id, _FINISH_STATUS[reason])

    def has_unfinished_requests(self) -> bool:
        return (
            self.scheduler.has_unfinished()
            or self._inflight is not None
            or self._unsampled is not None
        )

    # --- steps ----------------------------------------------------------------------------------
    def step(self) -> EngineCoreOutputs:
        """One step. With async scheduling, step N+1 is scheduled and launched before step N's
        results are read, so host work overlaps device work; results then lag one call. Without
        it, each step's results are read in the call that launched it.

        Structured outputs: a step's grammar rows need a bitmask built from every token before
        it, so its sampling waits for the previous step's tokens. With async scheduling step N's
        forward is launched and its sampling left to the next call, which reads step N-1's
        tokens, sends them to the grammar matchers with the request for N's bitmask, schedules
        step N+1 and builds its host inputs (while the matchers, in their own process on CUDA,
        accept and fill), waits for the bitmask, then launches N's sampling and N+1's forward
        back to back: all of that runs while the device runs forward N, and the device does not
        wait between N's sampling and N+1's forward for the host's scheduling."""
        outputs = self._finished_unscheduled()
        if self._inflight is not None and self._unsampled is None and self._proposing():
            # Speculating requests propose from their newest token: read it first (see
            # spec_decode/decoder.py).
            outputs += self._process(self._inflight.result())
            self._inflight = None
        to_sample = None  # step N, launched by the last call without its sampling
        if self._unsampled is not None:
            to_sample, self._unsampled = self._unsampled, None
            if self._inflight is not None:
                outputs += self._process(self._inflight.result())
                self._inflight = None
            # N's rows have every earlier token now: the matchers take the new ones and fill
            # N's bitmask (in their own process, while this one schedules N+1).
            self.structured.prefetch([r.grammar for r in to_sample.requests], to_sample.drafts)
        with self.profiler.stage("schedule"):
            sched = self.scheduler.schedule()
        block_ids = [] if sched.is_empty else self._block_ids(sched)
        planned = None
        if to_sample is not None:
            if not sched.is_empty:
                with self.profiler.stage("prepare inputs"):
                    planned = self.runner.host_inputs(sched.scheduled, block_ids, to_sample)
            self._inflight = self._sample(to_sample)
        previous, self._inflight = self._inflight, None
        if not sched.is_empty:
            launched = self.runner.launch(sched, block_ids, previous, planned)
            if not any(r.grammar is not None for r in launched.requests):
                self._inflight = self.runner.sample(launched)
            elif self.async_scheduling and not self._proposing():
                self._unsampled, self._inflight, previous = launched, previous, None
            else:  # sampled now: the next call reads its tokens before scheduling, to propose
                if previous is not None:
                    outputs += self._process(previous.result())
                    previous = None
                self._inflight = self._sample(launched)
        if not self.async_scheduling:
            if previous is not None:  # launched while async scheduling was on
                outputs += self._process(previous.result())
            previous, self._inflight = self._inflight, None
        if previous is not None:
            outputs += self._process(previous.result())
        elif sched.is_empty and self.scheduler.compiling:
            # Nothing runs but grammars compile: wait for one rather than spin.
            self.structured.wait_compiled(timeout=0.05)
        return self._outputs(outputs, sched)

    def _proposing(self) -> bool:
        """Speculation wants this step's tokens before the next is scheduled (to propose from
        them, or to finish verifying): a step with grammar rows is then sampled in the call
        that launched it, not left for the next."""
        return self.spec is not None and self.spec.wants_host_tokens(self.scheduler.running)

    def _sample(self, launched: LaunchedStep) -> StepHandle:
        """Launch a step's sampling with the bitmask of its grammar rows; every earlier step's
        tokens have been processed. A sample whose matcher refused its last token ends here
        with "error" (reported with the next outputs); its row's token is dropped."""
        with self.profiler.stage("grammar bitmask"):
            grammars = [r.grammar for r in launched.requests]
            bitmask = self.structured.bitmask(grammars, launched.drafts)
        for request in launched.requests:
            grammar = request.grammar
            if grammar is not None and grammar.error is not None and not request.is_finished:
                request.stop_reason = grammar.error
                self.scheduler.finish(request.request_id, RequestStatus.FINISHED_ERROR)
                self.scheduler.finished_unscheduled.append(request)
        return self.runner.sample(launched, bitmask)

    def _finished_unscheduled(self) -> list[EngineCoreOutput]:
        """Outputs for requests that ended outside a step's results (a grammar that failed to
        compile, or whose matcher refused a token)."""
        ended, self.scheduler.finished_unscheduled = self.scheduler.finished_unscheduled, []
        return [
            EngineCoreOutput(
                request_id=r.request_id,
                new_token_ids=[],
                finish_reason=r.finish_reason,
                stop_reason=r.stop_reason,
            )
            for r in ended
        ]

    def _block_ids(self, sched: SchedulerOutput) -> list[list[int]]:
        return [self.kv_cache.block_ids(s.request) for s in sched.scheduled]

    def _process(self, result: ModelRunnerOutput) -> list[EngineCoreOutput]:
        updates = self.scheduler.update_from_output(dict(zip(result.request_ids, result.token_ids)))
        logprobs = dict(zip(result.request_ids, result.logprobs or []))
        outputs = []
        for u in updates:
            request = u.request
            lps = logprobs.get(request.request_id)
            prompt_lps = None
            if request.needs_prompt_logprobs and u.num_new_tokens:
                prompt_lps, request.prompt_logprobs_sent = request.prompt_logprobs, True
            outputs.append(
                EngineCoreOutput(
                    request_id=request.request_id,
                    new_token_ids=request.output_token_ids[-u.num_new_tokens :],
                    new_logprobs=lps[: u.num_new_tokens] if lps is not None else None,
                    prompt_logprobs=prompt_lps,
                    finish_reason=request.finish_reason,
                    stop_reason=request.stop_reason,
                    num_cached_tokens=max(request.num_cached_tokens, 0),
                    num_draft_tokens=u.num_draft_tokens,
                    num_accepted_tokens=u.num_accepted_tokens,
                )
            )
        if self.spec is not None:
            self._spec_stats.add(updates)
            running = self.scheduler.running
            self.spec.propose((u.request for u in updates), len(running))
        return outputs

    def _outputs(
        self, outputs: list[EngineCoreOutput], sched: SchedulerOutput
    ) -> EngineCoreOutputs:
        """Outputs plus stats of `sched`, scheduled by this call."""
        stats = self.scheduler.stats()
        num_sampled = sum(1 for s in sched.scheduled if s.samples)
        num_prompt = sum(
            max(0, min(s.start + s.num_tokens, s.request.num_prompt_tokens) - s.start)
            for s in sched.scheduled
        )
        return EngineCoreOutputs(
            outputs=outputs,
            stats=SchedulerStatsMsg(
                num_running=stats.num_running,
                num_waiting=stats.num_waiting,
                kv_cache_usage=stats.kv_cache_usage,
                num_free_blocks=stats.num_free_blocks,
                num_total_blocks=self.num_blocks,
                prefix_cache_hit_rate=stats.prefix_cache_hit_rate,
                num_preemptions=stats.num_preemptions,
                num_prompt_tokens_computed=num_prompt,
                num_generation_tokens=num_sampled,
                spec_decode=self._take_spec_stats(),
                num_scheduled_tokens=sum(s.num_tokens for s in sched.scheduled),
            ),
            timestamp=time.monotonic(),
        )

    def _take_spec_stats(self) -> SpecDecodeStatsMsg | None:
        stats = self._spec_stats
        if self.spec is None or not stats.num_drafts:
            return None
        self._spec_stats = SpecDecodeStatsMsg.empty(len(stats.num_accepted_tokens_per_pos))
        return stats

    # --- utilities ------------------------------------------------------------------------------
    def start_profile(self, profile_dir: str | None = None) -> None:
        self.profiler.start(profile_dir)

    def stop_profile(self) -> str:
        return self.profiler.stop()

    def reset_prefix_cache(self) -> bool:
        return self.kv_cache.pool.reset_prefix_cache()

    def check_health(self) -> None:
        """Raise what has ended the engine outside a step (a tensor-parallel worker that
        died while it was idle); nothing otherwise."""
        self.runner.check_health()

    def shutdown(self) -> None:
        """Stop what outlives this object: tensor-parallel workers and the grammar process."""
        self.structured.shutdown()
        self.runner.shutdown()
