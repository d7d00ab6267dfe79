"""Frontend output side: incremental detokenization, stop strings, and `RequestOutput`s.

Text is decoded token by token with the tokenizers library's DecodeStream. While a request with
stop strings runs, the last (longest stop - 1) characters are held back, so that text already
shown is never taken back when a stop string completes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tokenizers.decoders import DecodeStream

from compiled_llm.engine.messages import EngineCoreOutput
from compiled_llm.outputs import (
    CompletionOutput,
    Logprob,
    PromptLogprobs,
    RequestMetrics,
    RequestOutput,
    SpecDecodeMetrics,
)
from compiled_llm.sampling_params import SamplingParams

_PROMPT_CONTEXT = 6  # prompt tokens primed into the decode stream (spacing of the first token)


@dataclass
class _Sample:
    index: int
    stream: DecodeStream
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class _ParentState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: dict[str, _Sample]  # by core request id
    metrics: RequestMetrics
    prompt_logprobs: PromptLogprobs | None = None

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples.values())


class OutputProcessor:
    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer  # None: token ids only, no text
        self._raw = tokenizer.backend_tokenizer if tokenizer is not None else None
        self._parents: dict[str, _ParentState] = {}
        self._child_to_parent: dict[str, str] = {}

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        child_ids: list[str],
        arrival_time: float,
    ) -> None:
        samples = {}
        for i, child in enumerate(child_ids):
            stream = DecodeStream(
                ids=prompt_token_ids[-_PROMPT_CONTEXT:],
                skip_special_tokens=params.skip_special_tokens,
            )
            samples[child] = _Sample(
                i, stream, logprobs=[] if params.logprobs is not None else None
            )
            self._child_to_parent[child] = request_id
        self._parents[request_id] = _ParentState(
            request_id, prompt, prompt_token_ids, params, samples, RequestMetrics(arrival_time)
        )

    def has_unfinished(self) -> bool:
        return bool(self._parents)

    def child_ids(self, request_id: str) -> list[str]:
        state = self._parents.get(request_id)
        return list(state.samples) if state else []

    def abort(self, request_id: str) -> None:
        state = self._parents.pop(request_id, None)
        for child in state.samples if state else ():
            self._child_to_parent.pop(child, None)

    def current_output(self, request_id: str) -> RequestOutput | None:
        """A running request's output so far (None if unknown or no token has come back)."""
        state = self._parents.get(request_id)
        if state is None or not any(s.token_ids for s in state.samples.values()):
            return None
        return self._make_output(state)

    def process_outputs(
        self, outputs: list[EngineCoreOutput], final_only: bool = False
    ) -> tuple[list[RequestOutput], list[str]]:
        """Returns the updated requests' outputs and the core requests to stop (stop strings).
        `final_only`: outputs of finished requests only (vLLM's RequestOutputKind.FINAL_ONLY,
        what the offline `LLM` wants): a running request's output copies all its tokens and
        text so far, every step (`current_output` gives one on demand)."""
        touched: dict[str, _ParentState] = {}
        to_stop: list[str] = []
        now = time.monotonic()
        for out in outputs:
            parent_id = self._child_to_parent.get(out.request_id)
            if parent_id is None:
                continue
            state = self._parents[parent_id]
            sample = state.samples[out.request_id]
            if sample.finish_reason is not None:
                continue
            if state.metrics.first_token_time is None and out.new_token_ids:
                state.metrics.first_token_time = now
            state.metrics.num_cached_tokens = out.num_cached_tokens
            if out.num_draft_tokens:
                spec = state.metrics.spec_decode = state.metrics.spec_decode or SpecDecodeMetrics()
                spec.num_spec_steps += 1
                spec.num_draft_tokens += out.num_draft_tokens
                spec.num_accepted_draft_tokens += out.num_accepted_tokens
            if out.prompt_logprobs is not None:
                state.prompt_logprobs = [
                    None if lp is None else self._logprob_entry(token, lp, state.params)
                    for token, lp in zip(state.prompt_token_ids, out.prompt_logprobs)
                ]
            if self._append(state.params, sample, out):
                to_stop.append(out.request_id)
            elif out.finish_reason is not None:
                sample.finish_reason = out.finish_reason
                sample.stop_reason = out.stop_reason
            touched[parent_id] = state
        results = []
        for parent_id, state in touched.items():
            if state.finished:
                state.metrics.finished_time = now
                self.abort(parent_id)
            elif final_only:
                continue
            results.append(self._make_output(state))
        return results, to_stop

    def _append(self, params: SamplingParams, sample: _Sample, out: EngineCoreOutput) -> bool:
        """Add new tokens and their text; True when a stop string ended the sample."""
        for i, token in enumerate(out.new_token_ids):
            sample.token_ids.append(token)
            if out.new_logprobs is not None and sample.logprobs is not None:
                self._add_logprobs(sample, token, out.new_logprobs[i], params)
            if self._raw is None or not params.detokenize:
                continue
            piece = sample.stream.step(self._raw, token)
            if not piece:
                continue
            before = len(sample.text)
            sample.text += piece
            if params.stop and self._check_stop_strings(params, sample, before):
                return True
        return False

    @staticmethod
    def _check_stop_strings(params: SamplingParams, sample: _Sample, before: int) -> bool:
        stops: list[str] = params.stop  # type: ignore[assignment]
        longest = max(len(s) for s in stops)
        window_start = max(0, before - longest + 1)
        found = [(sample.text.find(s, window_start), s) for s in stops]
        hits = [(pos, s) for pos, s in found if pos >= 0]
        if not hits:
            return False
        pos, stop = min(hits)
        end = pos + len(stop) if params.include_stop_str_in_output else pos
        sample.text = sample.text[:end]
        sample.finish_reason = "stop"
        sample.stop_reason = stop
        return True

    def _logprob_entry(self, token: int, lp: Any, params: SamplingParams) -> dict[int, Logprob]:
        """`token`'s logprob and rank, and the top ones (TokenLogprobs), with their text."""
        top_ids, top_lps, token_lp, rank = lp
        decode = (
            self.tokenizer.decode
            if self.tokenizer is not None and params.detokenize
            else (lambda ids: None)
        )
        entry = {
            tid: Logprob(lpv, r + 1, decode([tid]))
            for r, (tid, lpv) in enumerate(zip(top_ids, top_lps))
        }
        entry[token] = Logprob(token_lp, rank, decode([token]))
        return entry

    def _add_logprobs(self, sample: _Sample, token: int, lp: Any, params: SamplingParams) -> None:
        assert sample.logprobs is not None
        sample.logprobs.append(self._logprob_entry(token, lp, params))
        sample.cumulative_logprob = (sample.cumulative_logprob or 0.0) + lp[2]

    @staticmethod
    def _make_output(state: _ParentState) -> RequestOutput:
        params = state.params
        holdback = max((len(s) for s in params.stop or ()), default=1) - 1
        completions = []
        for sample in state.samples.values():
            text = sample.text
            if sample.finish_reason is None and holdback:
                text = text[: max(0, len(text) - holdback)]
            completions.append(
                CompletionOutput(
                    index=sample.index,
                    text=text,
                    token_ids=list(sample.token_ids),
                    cumulative_logprob=sample.cumulative_logprob,
                    logprobs=list(sample.logprobs) if sample.logprobs is not None else None,
                    finish_reason=sample.finish_reason,
                    stop_reason=sample.stop_reason,
                )
            )
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=completions,
            finished=state.finished,
            num_cached_tokens=state.metrics.num_cached_tokens,
            metrics=state.metrics,
            prompt_logprobs=state.prompt_logprobs,
        )
