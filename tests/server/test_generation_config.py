"""The server fills what a request leaves unset with the model's recommended values (its
generation_config.json, vLLM's `generation_config=auto`): here greedy decoding and at most 3
new tokens in chat. Oracle: the same requests with those values given explicitly."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import pytest

from tests.server.conftest import Server, start_server

MESSAGES = [{"role": "user", "content": "Tell me a long story"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_models) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("generation-config")
    model = tmp / "model"
    shutil.copytree(tiny_models("llama"), model)
    config = json.loads((model / "generation_config.json").read_text())
    config.update(temperature=0.0, max_new_tokens=3)
    (model / "generation_config.json").write_text(json.dumps(config))
    s = start_server(tmp / "server.log", model=str(model))
    yield s
    s.kill()


def test_unset_fields_take_the_models_values(server: Server) -> None:
    def completion(**kw: object) -> dict:
        r = server.post("/v1/completions", json={"prompt": "Once upon a time", **kw})
        assert r.status_code == 200, r.text
        return r.json()

    # greedy without temperature: the seed does not matter
    unset = [completion(max_tokens=6, seed=seed)["choices"][0]["text"] for seed in (1, 2)]
    greedy = completion(max_tokens=6, seed=3, temperature=0.0)["choices"][0]["text"]
    assert unset == [greedy, greedy]
    r = server.post("/v1/chat/completions", json={"messages": MESSAGES})
    assert r.status_code == 200, r.text
    choice, usage = r.json()["choices"][0], r.json()["usage"]
    assert usage["completion_tokens"] == 3 or choice["finish_reason"] == "stop"
    assert usage["completion_tokens"] <= 3
    r = server.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 5})
    assert r.json()["usage"]["completion_tokens"] <= 5
    if r.json()["choices"][0]["finish_reason"] == "length":
        assert r.json()["usage"]["completion_tokens"] == 5
