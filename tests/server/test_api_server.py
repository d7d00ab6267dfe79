"""The OpenAI-compatible server end to end: one live server per module (engine core in its own
process, ZeroMQ between them) on the embedded model, driven by the official `openai` client."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.server.conftest import API_KEY, Server, pid_alive

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is"
MAX = 6
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)


def complete(client: openai.OpenAI, **kw: object):  # type: ignore[no-untyped-def]
    args = dict(model=MODEL, prompt=PROMPT, max_tokens=MAX, temperature=0)
    return client.completions.create(**{**args, **kw})  # type: ignore[call-overload]


def chat(client: openai.OpenAI, **kw: object):  # type: ignore[no-untyped-def]
    args = dict(model=MODEL, messages=QUESTION, max_completion_tokens=MAX, temperature=0)
    return client.chat.completions.create(**{**args, **kw})  # type: ignore[call-overload]


def parallel(*calls: Callable[[], Any]) -> list[Any]:
    """Independent requests at once: the engine batches them (CPU steps cost about the same)."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(c) for c in calls]]


def test_health_models_and_separate_core_process(server: Server, client: openai.OpenAI) -> None:
    assert server.get("/health").status_code == 200
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert set(server.get("/version").json()) == {"version"}  # no process ids
    assert pid_alive(server.core_pid)


def test_completion_and_chat(client: openai.OpenAI) -> None:
    r, c, old = parallel(
        lambda: complete(client),
        lambda: chat(client),
        lambda: chat(client, max_completion_tokens=None, max_tokens=MAX),  # the older name
    )
    assert "Paris" in r.choices[0].text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == MAX
    assert r.usage.total_tokens == r.usage.prompt_tokens + MAX
    choice = c.choices[0]
    assert choice.message.role == "assistant" and "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert 0 < c.usage.completion_tokens <= MAX
    assert old.choices[0].message.content == choice.message.content


def test_beam_search(server: Server, client: openai.OpenAI) -> None:
    """vLLM's `use_beam_search`, on completions and chat: the n best sequences of beam width n
    as the n choices, their text without the prompt. Oracle: the offline LLM.beam_search of the
    same model and settings (itself checked against HF in tests/engine/test_beam_search.py) on
    the same prompt tokens. Fields that would shape the answer otherwise are a 400 naming
    them."""
    from compiled_llm import LLM, BeamSearchParams

    beams = {"use_beam_search": True}
    got, got_chat = parallel(
        lambda: complete(client, n=2, max_tokens=4, extra_body=beams),
        lambda: chat(client, n=2, max_completion_tokens=4, extra_body=beams),
    )
    llm = LLM(compilation_level=0, max_model_len=512, seed=0)
    chat_ids = llm.tokenizer.apply_chat_template(
        QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    want, want_chat = llm.beam_search(
        [PROMPT, {"prompt_token_ids": list(chat_ids)}],
        BeamSearchParams(beam_width=2, max_tokens=4),
    )
    start = got.usage.prompt_tokens
    assert [c.text for c in got.choices] == [
        llm.tokenizer.decode(s.tokens[start:]) for s in want.sequences
    ]
    assert [c.finish_reason for c in got.choices] == ["length", "length"]
    assert got.usage.completion_tokens == 8
    assert got_chat.usage.prompt_tokens == len(chat_ids)
    assert [c.message.content for c in got_chat.choices] == [
        llm.tokenizer.decode(s.tokens[len(chat_ids) :]) for s in want_chat.sequences
    ]
    assert [c.index for c in got_chat.choices] == [0, 1]
    assert [c.message.role for c in got_chat.choices] == ["assistant", "assistant"]
    for path, field, value in (
        ("/v1/completions", "stream", True),
        ("/v1/completions", "logprobs", 1),
        ("/v1/completions", "echo", True),
        ("/v1/chat/completions", "stream", True),
        ("/v1/chat/completions", "logprobs", True),
        ("/v1/chat/completions", "echo", True),
        ("/v1/chat/completions", "response_format", {"type": "json_object"}),
    ):
        body = {"prompt": PROMPT} if path == "/v1/completions" else {"messages": QUESTION}
        r = server.post(path, json={"model": MODEL, **body, "n": 2, **beams, field: value})
        param = r.json()["error"]["param"]
        assert r.status_code == 400 and field in (param or ""), (path, field, r.text)


def test_chat_echo(client: openai.OpenAI) -> None:
    """vLLM's chat `echo`: the last message's content before the reply where the reply
    continues it (no generation prompt: the reply takes the last message's role), streamed and
    not; nothing where a generation prompt starts a new assistant turn after a user message.
    Oracle: the same request without echo."""
    partial = [*QUESTION, {"role": "assistant", "content": "The capital of France"}]
    cont = {"add_generation_prompt": False}
    plain, echoed, streamed, new_turn, new_turn_echoed = parallel(
        lambda: chat(client, messages=partial, extra_body=cont),
        lambda: chat(client, messages=partial, extra_body={**cont, "echo": True}),
        lambda: list(
            chat(client, messages=partial, stream=True, extra_body={**cont, "echo": True})
        ),
        lambda: chat(client),
        lambda: chat(client, extra_body={"echo": True}),
    )
    reply = plain.choices[0].message.content or ""
    assert echoed.choices[0].message.content == "The capital of France" + reply
    deltas = [c.choices[0].delta.content or "" for c in streamed if c.choices]
    assert deltas[1] == "The capital of France"  # after the role chunk
    assert "".join(deltas) == echoed.choices[0].message.content
    assert new_turn_echoed.choices[0].message.content == new_turn.choices[0].message.content


def test_streaming_matches_non_streaming(client: openai.OpenAI) -> None:
    full, chunks, answer, stream = parallel(
        lambda: complete(client).choices[0].text,
        lambda: list(complete(client, stream=True, stream_options={"include_usage": True})),
        lambda: chat(client).choices[0].message.content,
        lambda: list(chat(client, stream=True)),
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == MAX
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == answer
    assert stream[-1].choices[0].finish_reason in ("stop", "length")


def test_n2_and_seeded_sampling(client: openai.OpenAI) -> None:
    kw = dict(prompt="My favourite animal is", temperature=1.0, n=2, seed=1234)

    def streamed() -> list[str]:
        texts = ["", ""]
        for chunk in complete(client, **kw, stream=True):
            texts[chunk.choices[0].index] += chunk.choices[0].text
        return texts

    a, b, other, texts = parallel(
        lambda: complete(client, **kw),
        lambda: complete(client, **kw),
        lambda: complete(client, **{**kw, "seed": 4321}),
        streamed,
    )
    assert sorted(c.index for c in a.choices) == [0, 1]
    by_index = [c.text for c in sorted(a.choices, key=lambda c: c.index)]
    assert by_index == [c.text for c in sorted(b.choices, key=lambda c: c.index)]  # same seed
    assert texts == by_index
    assert a.usage.completion_tokens == 2 * MAX
    assert [c.text for c in sorted(other.choices, key=lambda c: c.index)] != by_index


def test_logprobs(client: openai.OpenAI) -> None:
    r, c, streamed = parallel(
        lambda: complete(client, logprobs=3),
        lambda: chat(client, logprobs=True, top_logprobs=2),
        lambda: [x.choices[0] for x in complete(client, logprobs=1, stream=True) if x.choices],
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == MAX
    assert "".join(lp.tokens) == r.choices[0].text
    for top, sampled in zip(lp.top_logprobs, lp.token_logprobs):
        assert len(top) >= 3
        assert max(top.values()) == pytest.approx(sampled)  # greedy picks the top token
    tokens = [t for choice in streamed for t in choice.logprobs.tokens]
    assert tokens == lp.tokens
    offsets = [o for choice in streamed for o in choice.logprobs.text_offset]
    assert offsets == lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(MAX)]
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 2
        assert item.top_logprobs[0].token == item.token
        assert item.logprob <= 0.0


def test_echo_with_logprobs(server: Server, client: openai.OpenAI) -> None:
    """`echo` puts the prompt before the completion; with logprobs, the prompt's tokens' too
    (null for the first, as OpenAI's), lm-eval's loglikelihood request (max_tokens=1). Oracle:
    the sampler's logprob of the same token, completing the prompt's prefix."""
    plain, echoed, lp, streamed, extra, extra_streamed = parallel(
        lambda: complete(client),
        lambda: complete(client, echo=True),
        lambda: complete(client, echo=True, logprobs=2, max_tokens=1),
        lambda: [
            x.choices[0]
            for x in complete(client, echo=True, logprobs=2, max_tokens=1, stream=True)
            if x.choices
        ],
        lambda: complete(client, max_tokens=1, extra_body={"prompt_logprobs": 0}),
        lambda: [
            x.choices[0]
            for x in complete(client, max_tokens=2, stream=True, extra_body={"prompt_logprobs": 0})
            if x.choices
        ],
    )
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    body = lp.choices[0].logprobs
    n = lp.usage.prompt_tokens
    assert len(body.tokens) == len(body.token_logprobs) == len(body.text_offset) == n + 1
    assert body.token_logprobs[0] is None and body.top_logprobs[0] is None
    assert all(v <= 0 for v in body.token_logprobs[1:])
    assert body.text_offset[:n] == [sum(map(len, body.tokens[:i])) for i in range(n)]
    assert body.text_offset[n] == len(PROMPT)  # the completion's token, after the echoed text
    assert lp.choices[0].text.startswith(PROMPT)
    assert [t for c in streamed for t in c.logprobs.tokens] == body.tokens
    assert "".join(c.text for c in streamed) == lp.choices[0].text
    ids = server.post("/tokenize", json={"model": MODEL, "prompt": PROMPT}).json()["tokens"]
    assert len(ids) == n
    checked = 0
    for j in range(1, n):
        top = complete(client, prompt=ids[:j], max_tokens=1, logprobs=20).choices[0]
        ref = top.logprobs.top_logprobs[0]
        if body.tokens[j] in ref:  # among the 20 most likely after its prefix
            assert body.token_logprobs[j] == pytest.approx(ref[body.tokens[j]], abs=1e-3), j
            checked += 1
    assert checked >= n // 2
    # vLLM's prompt_logprobs field: the same values, keyed by token id
    field = extra.choices[0].model_extra["prompt_logprobs"]
    assert len(field) == n and field[0] is None
    for j in range(1, n):
        assert field[j][str(ids[j])]["logprob"] == pytest.approx(body.token_logprobs[j], abs=1e-4)
    # chat: at the response's top level, one entry per token of the rendered conversation
    reply = chat(client, max_completion_tokens=1, extra_body={"prompt_logprobs": 1})
    lps = reply.model_extra["prompt_logprobs"]
    assert len(lps) == reply.usage.prompt_tokens and lps[0] is None
    assert all(1 <= len(e) <= 2 and all(v["logprob"] <= 0 for v in e.values()) for e in lps[1:])
    # streamed: in each choice's first chunk only
    assert extra_streamed[0].model_extra["prompt_logprobs"] == field
    assert all("prompt_logprobs" not in (c.model_extra or {}) for c in extra_streamed[1:])


def test_stop_strings(client: openai.OpenAI) -> None:
    base = complete(client).choices[0].text
    stop = base[len(base) // 2 : len(base) // 2 + 2]
    expected = base[: base.find(stop)]
    r, chunks = parallel(
        lambda: complete(client, stop=[stop]),
        lambda: [c for c in complete(client, stop=stop, stream=True) if c.choices],
    )
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_token_id_prompt_tokenize_detokenize(server: Server, client: openai.OpenAI) -> None:
    tok = server.post("/tokenize", json={"prompt": PROMPT}).json()
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] == 512
    assert server.post("/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"] == PROMPT
    by_ids, by_text = parallel(
        lambda: complete(client, prompt=tok["tokens"]), lambda: complete(client)
    )
    assert by_ids.choices[0].text == by_text.choices[0].text
    chat_tokens = server.post("/tokenize", json={"messages": QUESTION}).json()
    assert chat_tokens["count"] > tok["count"]


def test_logit_bias_and_allowed_token_ids(server: Server, client: openai.OpenAI) -> None:
    """OpenAI's logit_bias (token ids as strings) and vLLM's allowed_token_ids steer a greedy
    completion that would otherwise say Paris."""

    def token(word: str) -> int:
        ids = server.post("/tokenize", json={"prompt": word}).json()["tokens"]
        assert len(ids) == 1, (word, ids)
        return ids[0]

    paris, rome = token(" Paris"), token(" Rome")
    romes = server.post("/detokenize", json={"tokens": [rome] * MAX}).json()["prompt"]
    assert "Paris" in complete(client).choices[0].text
    biased, allowed = parallel(
        lambda: complete(client, logit_bias={str(rome): 100}),
        lambda: complete(
            client, logit_bias={str(paris): -100}, extra_body={"allowed_token_ids": [paris, rome]}
        ),
    )
    assert biased.choices[0].text == romes
    assert allowed.choices[0].text == romes
    # vLLM's bad_words: the greedy answer changes, and Paris never comes
    banned = complete(client, extra_body={"bad_words": ["Paris"]}).choices[0].text
    assert "Paris" not in banned and banned


def test_truncate_prompt_tokens(server: Server, client: openai.OpenAI) -> None:
    ids = server.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    cut, tail = parallel(
        lambda: complete(client, extra_body={"truncate_prompt_tokens": 2}),
        lambda: complete(client, prompt=ids[-2:]),
    )
    assert cut.usage.prompt_tokens == 2
    assert cut.choices[0].text == tail.choices[0].text


def test_utility_endpoints(server: Server) -> None:
    assert server.post("/reset_prefix_cache").status_code == 200
    r = server.post("/start_profile")
    assert r.status_code == 400 and "--profile-dir" in r.json()["error"]["message"]


BAD_INPUTS = [
    # (case, path, body or raw bytes, status, param)
    ("invalid JSON", "/v1/completions", b"{bad", 400, None),
    ("temperature < 0", "/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("no prompt", "/v1/completions", {"max_tokens": 4}, 400, "prompt"),
    ("blank bad word", "/v1/completions", {"prompt": "hi", "bad_words": [" "]}, 400, "bad_words"),
    ("bad_words", "/v1/completions", {"prompt": "hi", "bad_words": ["x"] * 1025}, 400, "bad_words"),
    ("prompt too long", "/v1/completions", {"prompt": "hello " * 600}, 400, "prompt"),
    (
        "max_tokens too big",
        "/v1/completions",
        {"prompt": "hi", "max_tokens": 600},
        400,
        "max_tokens",
    ),
    ("too many logprobs", "/v1/completions", {"prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ("id outside vocab", "/v1/completions", {"prompt": [10**8]}, 400, "prompt"),
    ("no messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("bad top_p", "/v1/chat/completions", {"messages": QUESTION, "top_p": 0}, 400, "top_p"),
    ("unknown model", "/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "model"),
    (
        "unknown chat model",
        "/v1/chat/completions",
        {"model": "x", "messages": QUESTION},
        404,
        "model",
    ),
]


@pytest.mark.parametrize("case,path,body,status,param", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(
    server: Server, case: str, path: str, body, status: int, param: str | None
) -> None:  # type: ignore[no-untyped-def]
    if isinstance(body, bytes):
        r = server.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = server.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == status and error["message"] and error["type"]
    assert error["param"] == param


def test_unknown_fields_are_ignored(server: Server) -> None:
    body = {"prompt": PROMPT, "max_tokens": MAX, "temperature": 0, "bogus": {"a": [1]}}
    extra = {**body, "stream_options": {"include_usage": True, "x": 1}, "stream": False}
    r, plain = server.post("/v1/completions", json=extra), server.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]
    chat_body = {"messages": [{"role": "user", "content": "Hi", "name": "x"}], "max_tokens": 2}
    assert (
        server.post(
            "/v1/chat/completions", json={**chat_body, "parallel_tool_calls": False}
        ).status_code
        == 200
    )
    assert (
        server.post("/v1/completions", json={**body, "temperature": -1, "bogus": 1}).status_code
        == 400
    )
    assert server.post("/tokenize", json={"prompt": "hi", "bogus": 1}).status_code == 200
    assert "ignoring the unknown request field 'bogus'" in server.log.read_text()


def test_api_key_and_still_serving(server: Server, client: openai.OpenAI) -> None:
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}):
        r = server.post("/v1/completions", json={"prompt": "hi"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
    assert httpx.get(server.url + "/health").status_code == 200  # open without the key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        complete(client, model="nope")
    with pytest.raises(openai.BadRequestError):
        complete(client, temperature=-2)
    assert "Paris" in complete(client).choices[0].text  # after all the bad input


def test_waiting_limit_answers_503(server: Server) -> None:
    async def burst() -> list[int]:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(
            base_url=server.url, headers=headers, timeout=300, limits=limits
        ) as c:
            body = {"prompt": "Tell me a story about a dragon", "max_tokens": 1}
            rs = await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(160)))
        return [r.status_code for r in rs]

    codes = asyncio.run(burst())
    assert set(codes) == {200, 503}, codes
    assert codes.count(200) >= 96
    assert server.get("/health").status_code == 200
    assert server.metric("requests_total") >= 0  # /metrics still renders


def test_concurrent_streams_with_cancellation_free_blocks(server: Server) -> None:
    free_before = server.metric("kv_cache_free_blocks")
    aborted_before = _outcome(server, "abort")

    async def run() -> list[tuple[str | None, int]]:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)

        async def one(i: int) -> tuple[str | None, int]:
            stream = await client.completions.create(
                model=MODEL,
                prompt=f"Request {i}: write about the number {i}.",
                max_tokens=MAX,
                temperature=0.8,
                seed=i,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            finish, tokens = None, 0
            async for chunk in stream:
                if i % 4 == 0:  # 16 of 64 leave after their first chunk
                    await stream.close()
                    return "cancelled", 0
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            return finish, tokens

        try:
            return await asyncio.gather(*(one(i) for i in range(64)))
        finally:
            await client.close()

    results = asyncio.run(run())
    assert results.count(("cancelled", 0)) == 16
    assert [r for r in results if r[0] != "cancelled"] == [("length", MAX)] * 48
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if (
            server.metric("kv_cache_free_blocks") == free_before
            and server.metric("num_requests_running") == 0
        ):
            break
        time.sleep(0.2)
    assert server.metric("kv_cache_free_blocks") == free_before
    assert _outcome(server, "abort") - aborted_before == 16


def test_non_streaming_client_disconnect_aborts(server: Server) -> None:
    free_before = server.metric("kv_cache_free_blocks")
    aborted_before = _outcome(server, "abort")
    body = {"prompt": "Tell me everything you know.", "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        server.post("/v1/completions", json=body, timeout=3)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _outcome(server, "abort") == aborted_before:
        time.sleep(0.2)
    assert _outcome(server, "abort") == aborted_before + 1
    while time.monotonic() < deadline and server.metric("kv_cache_free_blocks") != free_before:
        time.sleep(0.2)
    assert server.metric("kv_cache_free_blocks") == free_before
    assert server.metric("num_requests_running") == 0


def _outcome(server: Server, outcome: str) -> float:
    for line in server.get("/metrics").text.splitlines():
        if line.startswith("compiled_llm:requests_total{") and f'outcome="{outcome}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(outcome)


def test_metrics(server: Server) -> None:
    # one served and one refused at admission (past the context), whatever ran here before
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
    assert server.post("/v1/completions", json=body).status_code == 200
    body["max_tokens"] = 100_000
    assert server.post("/v1/completions", json=body).status_code == 400
    text = server.get("/metrics").text
    for name in (
        "requests_total",
        "prompt_tokens_total",
        "generation_tokens_total",
        "time_to_first_token_seconds_bucket",
        "inter_token_latency_seconds_bucket",
        "e2e_request_latency_seconds_bucket",
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "kv_cache_free_blocks",
        "prefix_cache_hit_rate",
    ):
        assert f"compiled_llm:{name}" in text, name
    assert server.metric("generation_tokens_total") > 0
    assert _outcome(server, "rejected") > 0


def test_greedy_outputs_equal_offline_llm(client: openai.OpenAI) -> None:
    from compiled_llm import LLM, SamplingParams

    prompts = [PROMPT, "def fibonacci(n):", "Water boils at"]
    served, served_chat = parallel(lambda: complete(client, prompt=prompts), lambda: chat(client))
    by_index = sorted(served.choices, key=lambda c: c.index)

    llm = LLM(enforce_eager=True, max_model_len=512, seed=0)
    params = SamplingParams(temperature=0, max_tokens=MAX)
    offline = llm.generate(prompts, params, use_tqdm=False)
    assert [c.text for c in by_index] == [o.outputs[0].text for o in offline]
    offline_chat = llm.chat(QUESTION, params, use_tqdm=False)[0].outputs[0].text
    assert served_chat.choices[0].message.content == offline_chat


def test_benchmark_smoke(server: Server, tmp_path: Path) -> None:
    script = Path(__file__).parents[2] / "benchmarks" / "serve.py"
    cmd = [
        sys.executable,
        str(script),
        "--base-url",
        server.url,
        "--api-key",
        API_KEY,
        "--num-prompts",
        "4",
        "--input-len",
        "8",
        "--output-len",
        "4",
        "--max-concurrency",
        "2",
        "--result-dir",
        str(tmp_path),
        "--label",
        "smoke",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr + done.stdout
    assert done.stdout.lstrip().startswith("{")  # configuration first
    assert "TTFT (ms)" in done.stdout.splitlines()[-4]  # the table last
    result = json.loads((tmp_path / "smoke.json").read_text())
    assert result["completed"] == 4 and result["output_tokens"] == 16
    assert set(result["latency"]) == {"ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"}
    assert set(result["latency"]["ttft_ms"]) == {"mean", "p50", "p90", "p99"}
