"""The pieces behind the hardening, tested alone: a failed admission changes nothing, the engine
core refuses (and ends) a request it cannot run while others go on, and an unexpected error is a
500 that keeps the connection."""

from __future__ import annotations

import asyncio
import http.client
import json
import queue
import threading
import time
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
import uvicorn
from fastapi import FastAPI

from compiled_llm import LLM, SamplingParams
from compiled_llm.engine.messages import EngineCoreRequest
from compiled_llm.server.async_llm import AsyncLLM, EngineOverloadedError
from compiled_llm.server.messages import OutputType, RequestType
from tests.server.conftest import free_port


class _Client:
    """A CoreClient stand-in whose encoder can be made to fail."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.sent: list[bytes] = []

    def encode_add(self, request: EngineCoreRequest) -> bytes:
        if self.fail:
            raise OverflowError("can't serialize this")
        return msgspec.msgpack.encode(request)

    def send_add(self, payload: bytes) -> None:
        self.sent.append(payload)


def _engine(client: _Client, limit: int | None) -> AsyncLLM:
    engine = AsyncLLM.__new__(AsyncLLM)  # the frontend state alone, no core process
    engine.client = client  # type: ignore[assignment]
    engine.dead_reason = None
    engine.max_waiting_requests = limit
    engine.metrics = None
    engine._streams = {}
    engine._num_waiting = 0
    engine.output_processor = SimpleNamespace(added=[])  # type: ignore[assignment]
    engine.output_processor.add_request = lambda rid, *a: engine.output_processor.added.append(rid)  # type: ignore[union-attr]
    return engine


def _requests(n: int) -> list[EngineCoreRequest]:
    params = SamplingParams(n=n)
    return [EngineCoreRequest(f"r-{i}", [1, 2], params, 4, i, 0.0) for i in range(n)]


def test_failed_submit_leaves_no_state() -> None:
    failing = _engine(_Client(fail=True), limit=4)
    with pytest.raises(OverflowError):
        failing._submit("r", None, [1, 2], SamplingParams(n=2), _requests(2))
    assert failing.num_waiting == 0 and not failing._streams
    assert not failing.output_processor.added  # type: ignore[union-attr]

    full = _engine(_Client(fail=False), limit=3)
    full._submit("a", None, [1, 2], SamplingParams(n=2), _requests(2))
    with pytest.raises(EngineOverloadedError):
        full._submit("b", None, [1, 2], SamplingParams(n=2), _requests(2))
    with pytest.raises(ValueError, match="already in use"):
        full._submit("a", None, [1, 2], SamplingParams(), _requests(1))
    assert full.num_waiting == 2 and list(full._streams) == ["a"]
    assert full.output_processor.added == ["a"]  # type: ignore[union-attr]
    assert len(full.client.sent) == 2  # type: ignore[union-attr]


# --- the engine core's own checks ---------------------------------------------------------------
@pytest.fixture(scope="module")
def llm(tiny_models) -> LLM:
    return LLM(str(tiny_models("llama")), max_model_len=64, enforce_eager=True)


@pytest.mark.parametrize(
    "change",
    [
        {"sampling_seed": 2**63},
        {"sampling_seed": -1},
        {"priority": 2**63},
        {"prompt_token_ids": [1, 10**9]},
        {"prompt_token_ids": []},
        {"max_tokens": 0},
        {"max_tokens": 64},
    ],
    ids=str,
)
def test_core_refuses_what_it_cannot_run(llm: LLM, change: dict[str, Any]) -> None:
    """A request the frontend should have refused is refused by the core alone: nothing is
    queued, and the requests around it are served."""
    core = llm.engine.core
    fields = dict(
        request_id="bad",
        prompt_token_ids=[1, 2, 3],
        sampling_params=SamplingParams(max_tokens=4),
        max_tokens=4,
        sampling_seed=0,
        arrival_time=0.0,
    )
    with pytest.raises(ValueError):
        core.add_request(EngineCoreRequest(**{**fields, **change}))  # type: ignore[arg-type]
    assert not core.has_unfinished_requests()
    out = llm.generate("hello", SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_core_process_ends_an_undecodable_request() -> None:
    """An ADD whose SamplingParams refuse a value on decode (the core validates what arrives) is
    answered with an aborted output for its id, so its stream ends."""
    from compiled_llm.server.core_process import EngineCoreProc

    proc = EngineCoreProc.__new__(EngineCoreProc)  # its message handling alone, no sockets
    proc.output_queue = queue.Queue()
    params = SamplingParams(seed=1)
    params.seed = 2**63  # out of range; encodes as an unsigned 64-bit integer
    payload = msgspec.msgpack.encode(EngineCoreRequest("req-7", [1], params, 4, 0, 0.0))
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(payload, type=EngineCoreRequest)
    proc._on_malformed(RequestType.ADD.value, memoryview(payload), ValueError("bad seed"))
    kind, msg = proc.output_queue.get_nowait()
    assert kind == OutputType.OUTPUTS.value
    assert [(o.request_id, o.finish_reason) for o in msg.outputs] == [("req-7", "abort")]


# --- 500s -----------------------------------------------------------------------------------------
def test_unexpected_error_is_a_generic_500_on_a_kept_connection() -> None:
    from compiled_llm.server.api_server import _InternalErrorMiddleware

    app = FastAPI()
    app.add_middleware(_InternalErrorMiddleware)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret detail")

    @app.get("/ok")
    async def ok() -> dict[str, bool]:
        return {"ok": True}

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="critical"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.auto_open = 0  # a connection the server dropped fails instead of reopening
        conn.connect()
        for path, status in [("/boom", 500), ("/ok", 200), ("/boom", 500), ("/ok", 200)]:
            conn.request("GET", path)
            r = conn.getresponse()
            body = json.loads(r.read())
            assert r.status == status
            if status == 500:
                assert body["error"]["message"] == "internal server error"
                assert body["error"]["type"] == "InternalServerError"
        conn.close()
    finally:
        server.should_exit = True
        thread.join(30)
