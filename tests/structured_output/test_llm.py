"""Structured outputs through `LLM` on the embedded model (CPU, eager). Oracles: json +
jsonschema, re.fullmatch, membership in the choices, and greedy outputs of unconstrained or
unpreempted runs."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import jsonschema
import pytest

from compiled_llm import LLM, SamplingParams
from compiled_llm.engine.messages import EngineCoreRequest
from compiled_llm.sampling_params import StructuredOutputsParams as SO

pytestmark = pytest.mark.slow

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3},
    },
    "required": ["name", "age", "pets"],
}
ASK = [{"role": "user", "content": "Describe a person as JSON with a name, an age and pets."}]


@pytest.fixture(scope="module", params=["inline", "process"])
def llm(request: pytest.FixtureRequest) -> Iterator[LLM]:
    """The engine with the grammar matchers in its step loop, then in their own process (the
    default on CUDA): every test here runs with both."""
    # 20 blocks of 16 tokens: a few long samples at once run out and are preempted.
    llm = LLM(
        enforce_eager=True,
        max_model_len=256,
        seed=0,
        num_gpu_blocks_override=20,
        structured_outputs_matchers=request.param,
    )
    yield llm
    llm.engine.core.shutdown()


def texts(out) -> list[str]:
    return [c.text for c in out.outputs]


def test_json_schema_greedy_and_sampled(llm: LLM) -> None:
    free = llm.engine.num_free_blocks
    greedy = SamplingParams(temperature=0, max_tokens=80, structured_outputs=SO(json=PERSON))
    sampled = SamplingParams(
        temperature=1.0, n=3, seed=5, max_tokens=80, logprobs=2, structured_outputs=SO(json=PERSON)
    )
    out_greedy, out_sampled = llm.chat(ASK, [greedy], use_tqdm=False)[0], None
    out_sampled = llm.chat(ASK, sampled, use_tqdm=False)[0]
    for c in [*out_greedy.outputs, *out_sampled.outputs]:
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.text), PERSON)
    for c in out_sampled.outputs:  # logprobs of the constrained distribution: all finite
        assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids)
        assert all(entry[t].logprob > -1e9 for t, entry in zip(c.token_ids, c.logprobs))
    assert llm.engine.num_free_blocks == free


def test_regex_choice_grammar_and_json_object(llm: LLM) -> None:
    regex = r"[0-9]{3}-[a-z]{2,6}"
    choices = ["red", "green", 'blue "sky"']
    cases = [
        ("The code is ", SO(regex=regex)),
        ("My favourite colour is ", SO(choice=choices)),
        ("Answer yes or no: ", SO(grammar='root ::= ("yes" | "no") "!"')),
    ]
    params = [
        SamplingParams(temperature=1.0, n=4, seed=i, max_tokens=20, structured_outputs=so)
        for i, (_, so) in enumerate(cases)
    ]
    outs = llm.generate([p for p, _ in cases], params, use_tqdm=False)
    for text in texts(outs[0]):
        assert re.fullmatch(regex, text), text
    assert all(t in choices for t in texts(outs[1]))
    assert all(t in ("yes!", "no!") for t in texts(outs[2]))
    assert all(c.finish_reason == "stop" for o in outs for c in o.outputs)
    obj = llm.chat(
        ASK, SamplingParams(temperature=0, max_tokens=80, structured_outputs=SO(json_object=True))
    )[0].outputs[0]
    assert obj.finish_reason == "stop" and isinstance(json.loads(obj.text), dict)


def test_unconstrained_neighbours_are_unchanged(llm: LLM) -> None:
    plain = SamplingParams(temperature=0, max_tokens=24)
    alone = llm.generate(["The capital of France is"], plain, use_tqdm=False)[0]
    constrained = SamplingParams(
        temperature=0, max_tokens=24, structured_outputs=SO(regex="[a-z ]+")
    )
    mixed = llm.generate(
        ["The capital of France is", "The capital of Spain is"],
        [plain, constrained],
        use_tqdm=False,
    )
    assert mixed[0].outputs[0].token_ids == alone.outputs[0].token_ids
    assert re.fullmatch("[a-z ]+", mixed[1].outputs[0].text)


def test_preemption_and_prefix_cache_keep_the_grammar(llm: LLM) -> None:
    """Eight constrained samples of ~60 tokens do not fit 20 blocks together: some are preempted
    and recompute (prefix-cache hits included); each still equals the greedy answer run alone."""
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 16, "maxItems": 16}
    params = SamplingParams(
        temperature=0,
        max_tokens=120,
        structured_outputs=SO(json=schema, disable_any_whitespace=True),
    )
    prompt = "List sixteen numbers as a JSON array: "
    alone = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    before = llm.engine.core.scheduler.num_preemptions
    free = llm.engine.num_free_blocks
    crowd = llm.generate([prompt] * 8, params, use_tqdm=False)
    assert llm.engine.core.scheduler.num_preemptions > before
    for out in crowd:
        assert out.outputs[0].token_ids == alone.token_ids
        jsonschema.validate(json.loads(out.outputs[0].text), schema)
    assert llm.engine.num_free_blocks == free


@pytest.mark.parametrize("async_scheduling", [False])
def test_sync_scheduling_gives_the_same_tokens(llm: LLM, async_scheduling: bool) -> None:
    params = SamplingParams(temperature=0, max_tokens=80, structured_outputs=SO(json=PERSON))
    expected = llm.chat(ASK, params, use_tqdm=False)[0].outputs[0].token_ids
    llm.engine.core.async_scheduling = async_scheduling
    try:
        assert llm.chat(ASK, params, use_tqdm=False)[0].outputs[0].token_ids == expected
    finally:
        llm.engine.core.async_scheduling = True


def test_async_step_order_with_grammar_rows(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under async scheduling a call asks the matchers for step N's bitmask (prefetch) before
    it schedules step N+1 and builds N+1's host inputs, then waits for the mask (on the step
    loop's thread) and launches N's sampling and N+1's forward back to back (nothing scheduled
    between them), N+1 from the inputs built early."""
    import threading

    core = llm.engine.core
    runner, scheduler, manager = core.runner, core.scheduler, core.structured
    events: list[tuple[str, object]] = []

    def record(name, fn, detail=lambda *a, **k: None):  # noqa: ANN001, ANN202
        def wrapped(*args, **kwargs):  # noqa: ANN202
            events.append((name, detail(*args, **kwargs)))
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(scheduler, "schedule", record("schedule", scheduler.schedule))
    monkeypatch.setattr(runner, "sample", record("sample", runner.sample))
    monkeypatch.setattr(
        runner,
        "launch",
        record("launch", runner.launch, lambda s, b, p=None, planned=None: planned is not None),
    )
    monkeypatch.setattr(
        manager,
        "bitmask",
        record("fill", manager.bitmask, lambda g, d=None: threading.current_thread().name),
    )
    monkeypatch.setattr(manager, "prefetch", record("prefetch", manager.prefetch))
    params = SamplingParams(temperature=0, max_tokens=24, structured_outputs=SO(json=PERSON))
    plain = SamplingParams(temperature=0, max_tokens=24)
    llm.generate(["A person:", "Hello"], [params, plain], use_tqdm=False)
    names = "".join({"prefetch": "p", "schedule": "s", "fill": "f"}.get(e, "") for e, _ in events)
    assert names.count("psf") >= 10  # the matchers work while N+1 is scheduled
    fills = [d for e, d in events if e == "fill"]
    assert fills and all(name == threading.current_thread().name for name in fills)
    pairs = [(events[i], events[i + 1]) for i in range(len(events) - 1)]
    back_to_back = [b for a, b in pairs if a[0] == "sample" and b[0] == "launch"]
    assert len(back_to_back) >= 10  # every constrained decode step
    assert all(planned for _, planned in back_to_back)


def test_finish_reasons_length_stop_string_and_error(llm: LLM) -> None:
    free = llm.engine.num_free_blocks
    long = SamplingParams(temperature=0, max_tokens=5, structured_outputs=SO(json=PERSON))
    assert llm.chat(ASK, long, use_tqdm=False)[0].outputs[0].finish_reason == "length"
    stop = SamplingParams(
        temperature=0, max_tokens=80, stop=['"age"'], structured_outputs=SO(json=PERSON)
    )
    c = llm.chat(ASK, stop, use_tqdm=False)[0].outputs[0]
    assert (c.finish_reason, c.stop_reason) == ("stop", '"age"') and '"age"' not in c.text
    # The grammar ends after "a", but min_tokens bans the end-of-sequence token it then needs:
    # no token is allowed, and the request ends with "error" rather than hanging or crashing.
    stuck = SamplingParams(
        temperature=0, max_tokens=10, min_tokens=4, structured_outputs=SO(regex="a")
    )
    ok = SamplingParams(temperature=0, max_tokens=8)
    bad, good = llm.generate(["Say a:", "Hello"], [stuck, ok], use_tqdm=False)
    assert bad.outputs[0].finish_reason == "error"
    assert "grammar" in str(bad.outputs[0].stop_reason)
    assert good.outputs[0].finish_reason == "length"
    assert llm.engine.num_free_blocks == free


def test_compile_failure_in_the_core_ends_only_that_request(llm: LLM) -> None:
    """A grammar the frontend did not check (sent to the core directly) fails to compile on the
    core's thread: the request ends with "error", the others run on."""
    engine = llm.engine
    free = engine.num_free_blocks
    params = SamplingParams(max_tokens=4, structured_outputs=SO(regex="[a-"))
    params = params.clone(all_stop_token_ids={2})
    engine.core.add_request(EngineCoreRequest("broken", [1, 2, 3], params, 4, 0, 0.0))
    engine.add_request("fine", "Hello", SamplingParams(temperature=0, max_tokens=4))
    seen = {}
    while engine.core.has_unfinished_requests():
        for out in engine.core.step().outputs:
            if out.finish_reason is not None:
                seen[out.request_id] = out
    assert seen["broken"].finish_reason == "error"
    assert "compile" in str(seen["broken"].stop_reason)
    assert seen["fine"].finish_reason == "length"
    engine.output_processor.abort("fine")
    assert engine.num_free_blocks == free


@pytest.mark.parametrize(
    "so, field",
    [
        (SO(json={"type": "integer", "multipleOf": 2}), "structured_outputs.json.multipleOf"),
        (SO(regex="(ab"), "structured_outputs.regex"),
        (SO(grammar="root ::= nothing"), "structured_outputs.grammar"),
    ],
)
def test_bad_input_queues_nothing(llm: LLM, so: SO, field: str) -> None:
    free = llm.engine.num_free_blocks
    params = [SamplingParams(max_tokens=4), SamplingParams(max_tokens=4, structured_outputs=so)]
    with pytest.raises(ValueError, match=f"^{re.escape(field)}: "):
        llm.generate(["fine", "bad"], params, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.num_free_blocks == free


def test_chat_passes_tools_and_template_kwargs(llm: LLM) -> None:
    """LLM.chat hands tools, a chat template and its kwargs to the template, as vLLM's does:
    the prompt is the template's rendering of them."""
    template = (
        "{% for t in tools %}[{{ t.function.name }}]{% endfor %}{{ greeting }}"
        "{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    out = llm.chat(
        [{"role": "user", "content": " hi"}],
        SamplingParams(max_tokens=1),
        use_tqdm=False,
        chat_template=template,
        tools=tools,
        chat_template_kwargs={"greeting": "Hello"},
    )[0]
    expected = llm.get_tokenizer().encode("[get_weather]Hello hi", add_special_tokens=False)
    assert out.prompt_token_ids == expected
