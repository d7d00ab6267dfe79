"""Hostile and careless requests: each gets a 4xx in OpenAI's error shape (or is served), the
server keeps serving, and nothing leaks. One server on a tiny random model, with small limits."""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server.conftest import API_KEY, Server, pid_alive, start_server

WAITING_LIMIT = 4
PROMPT = "The capital of France is"
OK = {"prompt": PROMPT, "max_tokens": 2}
MESSAGES = [{"role": "user", "content": "Hi"}]
LOOP_FOREVER = "{% for i in range(10**9) %}{% for j in range(10**9) %}x{% endfor %}{% endfor %}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_models) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("hardening")
    s = start_server(
        tmp / "server.log",
        "--max-waiting-requests",
        str(WAITING_LIMIT),
        "--unauthenticated-endpoints",
        "/metrics",
        "--profile-dir",
        str(tmp / "traces"),
        model=str(tiny_models("llama")),
    )
    yield s
    s.kill()


def post_raw(server: Server, path: str, body: bytes) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    return server.post(path, content=body, headers=headers)


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == status and error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param, error
    return error


def assert_serves(server: Server) -> None:
    r = server.post("/v1/completions", json=OK)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length"


# --- validation at the edge ---------------------------------------------------------------------
BIG = 2**64
BAD = [
    # (case, path, body, status, param)
    ("seed 2**63", "/v1/completions", {**OK, "seed": 2**63}, 400, "seed"),
    ("seed 2**64", "/v1/completions", {**OK, "seed": BIG}, 400, "seed"),
    ("seed -2**63-1", "/v1/completions", {**OK, "seed": -(2**63) - 1}, 400, "seed"),
    ("priority 2**64", "/v1/completions", {**OK, "priority": BIG}, 400, "priority"),
    ("min_tokens 2**64", "/v1/completions", {**OK, "min_tokens": BIG}, 400, "min_tokens"),
    ("min_tokens > room", "/v1/chat/completions", {"messages": MESSAGES, "min_tokens": 2000}, 400, "min_tokens"),
    ("stop_token_ids 2**64", "/v1/completions", {**OK, "stop_token_ids": [BIG]}, 400, "stop_token_ids.0"),
    ("stop id outside vocab", "/v1/completions", {**OK, "stop_token_ids": [10**9]}, 400, "stop_token_ids"),
    ("logit_bias key not an id", "/v1/completions", {**OK, "logit_bias": {"a1": 1.0}}, 400, "logit_bias"),
    ("logit_bias 5000-digit key", "/v1/completions", {**OK, "logit_bias": {"9" * 5000: 1.0}}, 400, "logit_bias"),
    ("logit_bias id outside vocab", "/v1/completions", {**OK, "logit_bias": {"1000000000": 1.0}}, 400, "logit_bias"),
    ("allowed id outside vocab", "/v1/completions", {**OK, "allowed_token_ids": [10**9]}, 400, "allowed_token_ids"),
    ("allowed id 2**64", "/v1/completions", {**OK, "allowed_token_ids": [BIG]}, 400, "allowed_token_ids.0"),
    ("allowed ids empty", "/v1/completions", {**OK, "allowed_token_ids": []}, 400, "allowed_token_ids"),
    ("truncate_prompt_tokens 0", "/v1/completions", {**OK, "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens"),
    ("truncate_prompt_tokens -2", "/v1/completions", {**OK, "truncate_prompt_tokens": -2}, 400, "truncate_prompt_tokens"),
    ("max_tokens 2**64", "/v1/completions", {**OK, "max_tokens": BIG}, 400, "max_tokens"),
    ("booleans as token ids", "/v1/completions", {**OK, "prompt": [True, False]}, 400, None),
    ("boolean as n", "/v1/completions", {**OK, "n": True}, 400, "n"),
    ("float as max_tokens", "/v1/completions", {**OK, "max_tokens": 4.0}, 400, "max_tokens"),
    ("empty prompt list", "/v1/completions", {**OK, "prompt": []}, 400, "prompt"),
    ("negative token id", "/v1/completions", {**OK, "prompt": [1, -5]}, 400, None),
    ("50 prompts x n=128", "/v1/completions", {**OK, "prompt": [PROMPT] * 50, "n": 128}, 400, "n"),
    ("n=129", "/v1/completions", {**OK, "n": 129}, 400, "n"),
    ("top_k 2**64", "/v1/completions", {**OK, "top_k": BIG}, 400, "top_k"),
    ("negative top_k", "/v1/completions", {**OK, "top_k": -3}, 400, "top_k"),
    ("min_p 2", "/v1/completions", {**OK, "min_p": 2.0}, 400, "min_p"),
    ("empty stop", "/v1/completions", {**OK, "stop": [""]}, 400, "stop"),
    ("empty message list", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("message without role", "/v1/chat/completions", {"messages": [{"content": "x"}]}, 400, None),
    ("image part", "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, 400, None),
    ("tokenize no messages", "/tokenize", {"messages": []}, 400, "messages"),
    ("tokenize both", "/tokenize", {"prompt": "a", "messages": MESSAGES}, 400, None),
    ("tokenize neither", "/tokenize", {}, 400, None),
    ("detokenize outside vocab", "/detokenize", {"tokens": [10**9]}, 400, "tokens"),
    ("detokenize 2**64", "/detokenize", {"tokens": [BIG]}, 400, "tokens.0"),
    ("detokenize booleans", "/detokenize", {"tokens": [True]}, 400, "tokens.0"),
    ("body is a list", "/v1/completions", [1, 2], 400, None),
    ("request chat_template", "/v1/chat/completions", {"messages": MESSAGES, "chat_template": "{{ 1 }}"}, 400, "chat_template"),
    ("chat_template in kwargs", "/v1/chat/completions", {"messages": MESSAGES, "chat_template_kwargs": {"chat_template": LOOP_FOREVER}}, 400, "chat_template"),
    ("tokenize with a template", "/tokenize", {"messages": MESSAGES, "chat_template_kwargs": {"chat_template": LOOP_FOREVER}}, 400, "chat_template"),
    ("renderer option in kwargs", "/v1/chat/completions", {"messages": MESSAGES, "chat_template_kwargs": {"tokenize": False}}, 400, "chat_template_kwargs.tokenize"),
]  # fmt: skip


@pytest.mark.parametrize("case,path,body,status,param", BAD, ids=[c[0] for c in BAD])
def test_bad_request_is_4xx(
    server: Server, case: str, path: str, body: Any, status: int, param: str | None
) -> None:
    assert_error(server.post(path, json=body), status, param)


RAW = [
    # JSON that Python's parser takes but that no field may hold.
    ("repetition_penalty Infinity", b'{"prompt": "hi", "repetition_penalty": Infinity}', "repetition_penalty"),
    ("temperature NaN", b'{"prompt": "hi", "temperature": NaN}', "temperature"),
    ("logit_bias Infinity", b'{"prompt": "hi", "logit_bias": {"1": Infinity}}', "logit_bias"),
    ("lone surrogate in prompt", b'{"prompt": "a\\ud800b"}', "prompt"),
    ("lone surrogate in a stop string", b'{"prompt": "hi", "stop": ["\\udfff"]}', "stop.0"),
    ("invalid JSON", b'{"prompt": ', None),
]  # fmt: skip


@pytest.mark.parametrize("case,body,param", RAW, ids=[c[0] for c in RAW])
def test_bad_json_values_are_400(server: Server, case: str, body: bytes, param: str | None) -> None:
    assert_error(post_raw(server, "/v1/completions", body), 400, param)


def test_lone_surrogates_elsewhere_are_400(server: Server) -> None:
    for path, body in [
        ("/tokenize", b'{"prompt": "\\ud83d"}'),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud83d"}]}'),
        ("/v1/completions", b'{"prompt": "hi", "model": "\\ud83d"}'),
    ]:
        assert_error(post_raw(server, path, body), 400)
    assert_serves(server)


def test_largest_seeds_are_served(server: Server) -> None:
    """Seeds fill the signed 64-bit range; sample i of n uses seed + i folded into [0, 2**63)."""
    for seed in (2**63 - 1, -(2**63), 0):
        r = server.post("/v1/completions", json={**OK, "seed": seed, "n": 2, "temperature": 1})
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 2


def test_failed_admissions_leak_no_waiting_slot(server: Server) -> None:
    """Requests refused after parsing used to keep their waiting slot: WAITING_LIMIT of them
    made every later request 503. Refuse many, then fill every slot at once."""
    for body in [{**OK, "min_tokens": BIG}, {**OK, "stop_token_ids": [BIG]}, {**OK, "seed": BIG}]:
        for _ in range(WAITING_LIMIT):
            assert_error(server.post("/v1/completions", json=body), 400)
    for body in [{**OK, "prompt": [10**9]}, {**OK, "max_tokens": 10**6}]:
        for _ in range(WAITING_LIMIT):
            assert_error(server.post("/v1/completions", json=body), 400)

    async def fill() -> list[int]:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=300) as c:
            body = {**OK, "n": WAITING_LIMIT // 2}
            rs = await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(2)))
        return [r.status_code for r in rs]

    assert asyncio.run(fill()) == [200, 200]
    assert server.metric("num_requests_waiting") == 0


# --- the event loop stays free --------------------------------------------------------------------
def health_latencies(server: Server, work: threading.Thread) -> list[float]:
    """Seconds /health takes while `work` runs (at least one probe)."""
    latencies = []
    with httpx.Client(base_url=server.url, timeout=30) as c:
        while work.is_alive() or not latencies:
            start = time.monotonic()
            assert c.get("/health").status_code == 200
            latencies.append(time.monotonic() - start)
            time.sleep(0.05)
    return latencies


def in_background(fn: Any) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(fn()))
    thread.start()
    return thread, result


def test_large_tokenization_does_not_block_health(server: Server) -> None:
    text = "word " * 700_000  # 3.5 MB: under the 4 MiB body limit
    work, result = in_background(lambda: server.post("/tokenize", json={"prompt": text}))
    latencies = health_latencies(server, work)
    work.join()
    assert result[0].status_code == 200 and result[0].json()["count"] >= 700_000
    assert len(latencies) > 1 and max(latencies) < 1.0, latencies


def test_request_chat_template_refused_and_health_answers(server: Server) -> None:
    body = {"messages": MESSAGES, "chat_template_kwargs": {"chat_template": LOOP_FOREVER}}
    work, result = in_background(lambda: server.post("/v1/chat/completions", json=body))
    latencies = health_latencies(server, work)
    work.join()
    assert_error(result[0], 400, "chat_template")
    assert max(latencies) < 1.0
    assert_serves(server)


def test_body_over_the_limit_is_413(server: Server) -> None:
    body = json.dumps({"prompt": "x" * (5 << 20)}).encode()
    assert_error(post_raw(server, "/v1/completions", body), 413)

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(5):
            yield b"x" * (1 << 20)
        yield b'"}'

    assert_error(post_raw(server, "/tokenize", chunked()), 413)  # type: ignore[arg-type]
    assert_serves(server)


# --- errors keep the connection -----------------------------------------------------------------
def test_client_errors_keep_the_connection(server: Server) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.auto_open = 0  # a connection the server closed fails instead of reopening
    conn.connect()
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    requests = [
        ("POST", "/v1/completions", b'{"prompt": "\\ud800"}', 400),
        ("POST", "/tokenize", b'{"messages": []}', 400),
        ("POST", "/v1/completions", b'{"prompt": "hi", "seed": 18446744073709551616}', 400),
        ("GET", "/no/such/path", b"", 404),
        ("GET", "/v1/completions", b"", 405),
        ("POST", "/v1/completions", json.dumps(OK).encode(), 200),
    ]
    for method, path, body, status in requests:
        conn.request(method, path, body=body or None, headers=headers)
        r = conn.getresponse()
        payload = json.loads(r.read())
        assert r.status == status, payload
        assert status == 200 or payload["error"]["code"] == status
    conn.close()


def test_profile_state_errors_are_409(server: Server) -> None:
    first = server.post("/start_profile")
    assert first.status_code == 200, first.text
    assert_error(server.post("/start_profile"), 409)
    stopped = server.post("/stop_profile")
    assert stopped.status_code == 200 and Path(stopped.json()["trace"]).is_file()
    assert_error(server.post("/stop_profile"), 409)
    assert_serves(server)


# --- auth ---------------------------------------------------------------------------------------
ENDPOINTS = [
    ("GET", "/v1/models"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("POST", "/reset_prefix_cache"),
    ("POST", "/start_profile"),
    ("POST", "/stop_profile"),
    ("GET", "/version"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("GET", "/no/such/path"),
]


@pytest.mark.parametrize("method,path", ENDPOINTS, ids=[p for _, p in ENDPOINTS])
def test_every_endpoint_needs_the_key(server: Server, method: str, path: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.request(method, server.url + path, headers=headers, json={}, timeout=60)
        assert_error(r, 401)


def test_cors_as_vllm_by_default(server: Server) -> None:
    """A browser page on another origin: its preflight needs no key (browsers send none) and
    is allowed; answers, a 401 included, carry the allow-origin header the browser needs to
    read them (vLLM's defaults: every origin, method and header)."""
    origin = {"Origin": "https://ui.example"}
    preflight = httpx.options(
        server.url + "/v1/chat/completions",
        headers={
            **origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
        timeout=60,
    )
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    served = server.post("/v1/completions", json=OK, headers=origin)
    assert served.status_code == 200 and served.headers["access-control-allow-origin"] == "*"
    refused = httpx.post(server.url + "/v1/completions", json=OK, headers=origin, timeout=60)
    assert_error(refused, 401)
    assert refused.headers["access-control-allow-origin"] == "*"
    plain = server.get("/v1/models")  # no Origin: not a cross-origin request, no CORS headers
    assert "access-control-allow-origin" not in plain.headers


def test_bad_cors_flag_stops_the_command() -> None:
    cmd = [sys.executable, "-m", "compiled_llm.cli", "serve", "--allowed-origins", "*"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "JSON" in done.stderr, done.stderr[-2000:]


def test_open_endpoints_and_docs_off(server: Server) -> None:
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200  # --unauthenticated-endpoints
    for path in ("/docs", "/openapi.json"):  # off without --enable-docs
        assert_error(server.get(path), 404)
    assert list(server.get("/version").json()) == ["version"]  # no process ids


# --- lifecycle (own servers) --------------------------------------------------------------------
def test_busy_port_fails_before_the_model_loads(tiny_models) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = [sys.executable, "-m", "compiled_llm.cli", "serve", str(tiny_models("llama"))]
        done = subprocess.run(
            [*cmd, "--port", str(port), "-O0"], capture_output=True, text=True, timeout=300
        )
    assert done.returncode == 2, done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr
    assert "engine core" not in done.stderr  # never started: nothing was loaded


def test_killed_server_leaves_no_socket_folder(
    tiny_models, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The server makes its socket folder in $TMPDIR: a folder of this test's own, so that other
    # servers on the machine (other tests, other xdist workers) neither add to nor take from what
    # it sees. Short, below /tmp: a unix socket's path has room for ~107 characters.
    tmp = Path(tempfile.mkdtemp(prefix="cl-"))
    monkeypatch.setenv("TMPDIR", str(tmp))  # start_server passes os.environ to the server
    try:
        s = start_server(tmp_path / "server.log", model=str(tiny_models("llama")))
        core = s.core_pid
        created = set(tmp.glob("compiled-llm-*"))
        assert len(created) == 1
        s.proc.kill()  # SIGKILL: the API server cleans nothing; the core notices and does
        s.proc.wait(30)
        deadline = time.monotonic() + 30
        while (pid_alive(core) or any(p.exists() for p in created)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not pid_alive(core)
        assert not any(p.exists() for p in created)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
