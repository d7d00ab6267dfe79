"""`LLM`: offline batched generation, with vLLM's call shapes so user code ports unchanged."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from compiled_llm.beam_search import beam_search, check_beam_width
from compiled_llm.config import EngineArgs
from compiled_llm.engine.llm_engine import LLMEngine
from compiled_llm.engine.processor import PromptType
from compiled_llm.outputs import BeamSearchOutput, RequestOutput
from compiled_llm.sampling_params import BeamSearchParams, SamplingParams

logger = logging.getLogger(__name__)


class LLM:
    """`LLM()` runs the embedded default model; `LLM(model=PATH, **engine_args)` any local one."""

    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        start = time.perf_counter()
        config = EngineArgs.from_kwargs(model=model, **engine_args).create_config()
        config_seconds = time.perf_counter() - start
        self.engine = LLMEngine(config)
        # Seconds per start stage (config, tokenizer, weights, kv_cache, compile, ...).
        self.start_seconds = {"config": config_seconds, **self.engine.start_seconds}
        logger.info(
            "ready in %.1f s (%s)",
            time.perf_counter() - start,
            ", ".join(f"{name} {s:.1f}" for name, s in self.start_seconds.items()),
        )

    @property
    def tokenizer(self) -> Any:
        """The transformers tokenizer, loaded on first use (generating needs none)."""
        return self.engine.tokenizer

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def start_profile(self, profile_dir: str | None = None) -> None:
        """Start a torch-profiler window (traces go to `profile_dir` or the engine's)."""
        self.engine.core.start_profile(profile_dir)

    def stop_profile(self) -> str:
        """End the window; returns the path of its Chrome/Perfetto JSON trace."""
        return self.engine.core.stop_profile()

    def reset_prefix_cache(self) -> bool:
        """Forget the cached prompt prefixes (vLLM's): False, and nothing forgotten, while a
        request holds blocks."""
        return self.engine.core.reset_prefix_cache()

    def get_default_sampling_params(self) -> SamplingParams:
        """What `generate` and `chat` use without sampling params (vLLM's): the model's
        recommended values from its generation_config.json (the engine's `generation_config`
        and `override_generation_config`), SamplingParams' own defaults elsewhere."""
        return SamplingParams(**dict(self.engine.config.model_config.sampling_defaults))

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        if isinstance(prompts, str | dict):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            if not isinstance(sampling_params, Sequence) or not all(
                isinstance(p, SamplingParams) for p in sampling_params
            ):
                raise ValueError(
                    "sampling_params must be a SamplingParams or a list of them, got "
                    f"{type(sampling_params).__name__}"
                )
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(
                    f"sampling_params has {len(params)} entries for {len(prompts)} prompts"
                )
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"priority has {len(priority)} entries for {len(prompts)} prompts")
        # Validate everything first, so bad input queues nothing.
        ids = [self.engine.next_request_id() for _ in prompts]
        added: list[str] = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                self.engine.add_request(ids[i], prompt, p, priority[i] if priority else 0)
                added.append(ids[i])
        except Exception:
            for request_id in added:
                self.engine.abort_request(request_id)
            raise
        return self._run(ids, use_tqdm)

    def beam_search(
        self,
        prompts: PromptType | Sequence[PromptType],
        params: BeamSearchParams,
        use_tqdm: bool = False,
    ) -> list[BeamSearchOutput]:
        """vLLM's beam search (compiled_llm/beam_search.py): per prompt, the `beam_width` best
        sequences, best first; their `tokens` and `text` include the prompt, as in vLLM."""
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        prompts = [prompts] if isinstance(prompts, str | dict) else list(prompts)
        mc = self.engine.config.model_config
        check_beam_width(params.beam_width, mc.max_logprobs, "beam_width")
        tokenizer = self.engine.tokenizer
        bar = tqdm(total=params.max_tokens, desc="Beam search steps", disable=not use_tqdm)

        def step(requests: list[Any], sampling: SamplingParams) -> list[RequestOutput]:
            bar.update(1)
            return self.generate(requests, sampling, use_tqdm=False)

        try:
            return beam_search(
                step,
                prompts,
                params,
                self.engine.processor.eos_ids,
                mc.max_model_len,
                tokenizer.decode if tokenizer is not None else None,
            )
        finally:
            bar.close()

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to conversations, each rendered by the chat template (the
        tokenizer's, or `chat_template`) with `tools` (OpenAI-style function definitions) and
        `chat_template_kwargs` passed to it, as in vLLM. Tool calls in the output are not parsed
        here: the server's tool parsers do that (docs/tool_calling.md)."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer (skip_tokenizer_init is set)")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts: list[PromptType] = []
        for conversation in conversations:
            ids = self.tokenizer.apply_chat_template(
                conversation,
                add_generation_prompt=add_generation_prompt,
                tokenize=True,
                chat_template=chat_template,
                tools=tools,
                **(chat_template_kwargs or {}),
            )
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            prompts.append({"prompt_token_ids": list(ids)})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        wanted = set(request_ids)
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm)
        start = time.perf_counter()
        in_tokens = out_tokens = 0
        try:
            while len(finished) < len(wanted) and self.engine.has_unfinished_requests():
                # Finished requests' outputs only: building every running request's output
                # each step (a copy of all its tokens and text) was host time on the step
                # loop's thread.
                for out in self.engine.step(final_only=True):
                    if out.request_id not in wanted:
                        continue
                    finished[out.request_id] = out
                    in_tokens += len(out.prompt_token_ids)
                    out_tokens += sum(len(c.token_ids) for c in out.outputs)
                    elapsed = max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix_str(
                        f"in {in_tokens / elapsed:.1f} tok/s, out {out_tokens / elapsed:.1f} tok/s"
                    )
                    bar.update(1)
        except KeyboardInterrupt as e:
            partial = [finished.get(i) or self.engine.current_output(i) for i in request_ids]
            for request_id in request_ids:
                if request_id not in finished:
                    self.engine.abort_request(request_id)
            raise GenerationInterrupted(partial) from e
        finally:
            bar.close()
        return [finished[i] for i in request_ids]


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C during `LLM.generate` or `LLM.chat`. The unfinished requests were aborted;
    `outputs` holds each prompt's output so far, in order (None where nothing came back yet)."""

    def __init__(self, outputs: list[RequestOutput | None]) -> None:
        super().__init__("generation interrupted")
        self.outputs = outputs
