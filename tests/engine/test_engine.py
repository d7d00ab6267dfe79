"""Scheduler behaviour end to end on a tiny model: preemption, prefix caching, chunked prefill,
priorities, and that no KV block leaks."""

from __future__ import annotations

import pytest

from compiled_llm import LLM, SamplingParams

PROMPTS = [f"Request number {i} asks about " + "the weather " * (i + 1) for i in range(8)]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.8, top_p=0.95, seed=7, max_tokens=24, ignore_eos=True)


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def roomy(tiny_models) -> LLM:
    return LLM(str(tiny_models("llama")), max_model_len=256, enforce_eager=True)


@pytest.mark.slow
def test_preemption_keeps_outputs(tiny_models, roomy: LLM) -> None:
    # 16 blocks of 16 tokens cannot hold 8 requests of ~60 tokens: some must be preempted.
    small = LLM(
        str(tiny_models("llama")),
        max_model_len=256,
        num_gpu_blocks_override=16,
        enforce_eager=True,
    )
    free = small.engine.num_free_blocks
    for params in (GREEDY, SEEDED):
        before = small.engine.core.scheduler.num_preemptions
        got = small.generate(PROMPTS, params, use_tqdm=False)
        assert small.engine.core.scheduler.num_preemptions > before
        assert token_ids(got) == token_ids(roomy.generate(PROMPTS, params, use_tqdm=False))
    assert small.engine.num_free_blocks == free


def test_prefix_caching_skips_shared_prompt(tiny_models) -> None:
    path = str(tiny_models("llama"))
    shared = "A long shared system prompt that many requests start with. " * 6
    first, second = shared + "First question?", shared + "Second question, different."
    cached = LLM(path, max_model_len=256, enforce_eager=True)
    free = cached.engine.num_free_blocks
    cached.generate(first, GREEDY, use_tqdm=False)
    computed_before = cached.engine.num_prompt_tokens_computed
    out = cached.generate(second, GREEDY, use_tqdm=False)[0]
    computed = cached.engine.num_prompt_tokens_computed - computed_before
    assert out.num_cached_tokens >= 32
    assert computed == len(out.prompt_token_ids) - out.num_cached_tokens
    uncached = LLM(path, max_model_len=256, enforce_eager=True, enable_prefix_caching=False)
    reference = uncached.generate(second, GREEDY, use_tqdm=False)[0]
    assert reference.num_cached_tokens == 0
    assert out.outputs[0].token_ids == reference.outputs[0].token_ids
    assert cached.engine.num_free_blocks == free
    # LLM.reset_prefix_cache (vLLM's): the same prompt again is computed in full
    assert cached.reset_prefix_cache()
    again = cached.generate(second, GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens == 0
    assert again.outputs[0].token_ids == reference.outputs[0].token_ids


def test_chunked_prefill_long_prompt(tiny_models, roomy: LLM) -> None:
    prompt = "Chunked prefill splits a long prompt over several steps. " * 12
    chunked = LLM(
        str(tiny_models("llama")),
        max_model_len=256,
        max_num_batched_tokens=32,
        enforce_eager=True,
        enable_prefix_caching=False,
    )
    out = chunked.generate(prompt, GREEDY, use_tqdm=False)[0]
    assert len(out.prompt_token_ids) > 32
    expected = roomy.generate(prompt, GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == expected.outputs[0].token_ids


def test_priority_then_arrival_order(tiny_models) -> None:
    llm = LLM(str(tiny_models("llama")), max_model_len=256, max_num_seqs=1, enforce_eager=True)
    engine = llm.engine
    for request_id, priority in [("a", 1), ("b", 0), ("c", 1), ("d", 0)]:
        engine.add_request(request_id, "Hello there", GREEDY, priority=priority)
    order = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["b", "d", "a", "c"]


def test_abort_frees_blocks(roomy: LLM) -> None:
    engine = roomy.engine
    free = engine.num_free_blocks
    engine.add_request("x", "Abort me after a few steps", GREEDY)
    engine.add_request("y", "Keep me running", GREEDY)
    for _ in range(3):
        engine.step()
    engine.abort_request("x")
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == ["y"]
    assert len(finished[0].outputs[0].token_ids) == 24
    assert engine.num_free_blocks == free


def test_n_samples_and_stop_strings(roomy: LLM) -> None:
    params = SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=16, ignore_eos=True)
    out = roomy.generate("Three samples please", params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    # A stop string cut from the text: take a word the model really produces.
    full = roomy.generate("Stop strings", GREEDY, use_tqdm=False)[0].outputs[0]
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    assert stop.strip(), f"generated text too thin for a stop-string test: {full.text!r}"
    cut = roomy.generate(
        "Stop strings", SamplingParams(temperature=0, max_tokens=24, stop=[stop]), use_tqdm=False
    )[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[: full.text.find(stop)]
    assert stop not in cut.text


def test_detokenize_false_gives_the_same_tokens_without_text(roomy: LLM) -> None:
    """vLLM's detokenize=False: the same tokens and logprobs as with text, but no text
    (CompletionOutput.text "", decoded_token None, the prompt's logprobs too)."""
    kw = dict(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    prompt = "Token ids only"
    text, ids = (
        roomy.generate(prompt, SamplingParams(**kw, detokenize=d), use_tqdm=False)[0]
        for d in (True, False)
    )
    assert text.outputs[0].text and ids.outputs[0].text == ""
    assert ids.outputs[0].token_ids == text.outputs[0].token_ids
    for got, want in zip(ids.outputs[0].logprobs, text.outputs[0].logprobs, strict=True):
        assert {t: lp.logprob for t, lp in got.items()} == {t: lp.logprob for t, lp in want.items()}
        assert all(lp.decoded_token is None for lp in got.values())
        assert all(lp.decoded_token is not None for lp in want.values())
    assert ids.prompt_logprobs[0] is None
    assert all(
        lp.decoded_token is None for entry in ids.prompt_logprobs[1:] for lp in entry.values()
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "params",
    [
        GREEDY,
        SEEDED,
        SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=12, min_tokens=4, logprobs=2),
        SamplingParams(temperature=0.7, seed=5, max_tokens=16, repetition_penalty=1.3),
        SamplingParams(temperature=0, max_tokens=16, presence_penalty=1.5, frequency_penalty=1.0),
    ],
    ids=["greedy", "seeded", "n-min-logprobs", "penalties", "greedy-penalties"],
)
def test_async_scheduling_gives_identical_outputs(tiny_models, params) -> None:
    path = str(tiny_models("llama"))
    runs = []
    for async_scheduling in (False, True):
        llm = LLM(
            path,
            max_model_len=256,
            enforce_eager=True,
            async_scheduling=async_scheduling,
            num_gpu_blocks_override=24,  # tight: preemptions too
        )
        free = llm.engine.num_free_blocks
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        assert llm.engine.num_free_blocks == free
        runs.append([[(c.token_ids, c.text, c.logprobs) for c in o.outputs] for o in outs])
    assert runs[0] == runs[1]


def test_synthetic_batches_stay_within_max_model_len(roomy: LLM) -> None:
    """Graph capture runs synthetic batches of up to max_num_batched_tokens tokens; a request
    longer than max_model_len would index past the RoPE table (a device-side assert on CUDA),
    so sizes above it are split across requests."""
    runner = roomy.engine.core.runner
    for num_tokens, num_reqs in [(512, 1), (257, 1), (256, 1), (9, 4), (3, 8)]:
        ids, positions, attn = runner.dummy_inputs(num_tokens, num_reqs)
        assert ids.shape[0] == positions.shape[0] == num_tokens
        assert int(positions.max()) < 256 and attn.max_seq_len <= 256
        assert int(attn.query_start_loc[-1]) == num_tokens
    _, positions, _ = runner.dummy_inputs(256, 1)
    assert positions.tolist() == list(range(256))  # fits: still one request


def test_final_only_steps_give_the_cumulative_final_outputs(roomy: LLM) -> None:
    """`step(final_only=True)` (what `LLM.generate` runs) returns finished requests only, each
    as the step-by-step outputs end; `current_output` gives a running request's output so far,
    a prefix of its final one (what Ctrl-C returns)."""
    engine = roomy.engine
    stop = SamplingParams(temperature=0, max_tokens=24, stop=["weather"], n=2, seed=1)
    params = [GREEDY, SEEDED, stop]

    def run(final_only: bool) -> tuple[dict, list]:
        for i, p in enumerate(params):
            engine.add_request(f"{final_only}-{i}", PROMPTS[i], p)
        finals, partial, steps = {}, [], 0
        while engine.has_unfinished_requests():
            outs = engine.step(final_only=final_only)
            steps += 1
            if final_only:
                assert all(o.finished for o in outs)
                if steps == 6:
                    partial = [engine.current_output(f"True-{i}") for i in range(len(params))]
            finals.update({o.request_id.split("-")[1]: o for o in outs if o.finished})
        return finals, partial

    cumulative, _ = run(False)
    final, partial = run(True)
    assert final.keys() == cumulative.keys() == {"0", "1", "2"}
    for key, out in final.items():
        want = cumulative[key]
        assert [(c.text, c.token_ids, c.finish_reason) for c in out.outputs] == [
            (c.text, c.token_ids, c.finish_reason) for c in want.outputs
        ]
    running = [p for p in partial if p is not None]
    assert running  # some request was still running at step 6
    for p in running:
        whole = final[p.request_id.split("-")[1]]
        for got, end in zip(p.outputs, whole.outputs):
            assert not got.finish_reason or got.finish_reason == end.finish_reason
            assert end.token_ids[: len(got.token_ids)] == got.token_ids
            assert end.text.startswith(got.text)
    assert engine.current_output("True-0") is None  # finished: no longer known
