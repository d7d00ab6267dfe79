"""`compiled-llm serve --speculative-config JSON`: the flag reaches the engine-core process,
/metrics counts drafts with vLLM's spec_decode names, and a request with structured outputs
speculates under its grammar."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.server.conftest import start_server
from tests.spec_decode.conftest import chain

pytestmark = pytest.mark.slow


def test_serve_with_ngram(tmp_path: Path, cycle_model: Path) -> None:
    config = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}
    server = start_server(
        tmp_path / "server.log",
        "--speculative-config",
        json.dumps(config),
        "--max-model-len",
        "256",
        "--served-model-name",
        "cycle",
        model=str(cycle_model),
    )
    try:
        body = {"model": "cycle", "prompt": chain(17, 40) + [17], "max_tokens": 32}
        body |= {"temperature": 0, "ignore_eos": True}
        r = server.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 32
        drafts = server.metric("spec_decode_num_draft_tokens_total")
        accepted = server.metric("spec_decode_num_accepted_tokens_total")
        assert server.metric("spec_decode_num_drafts_total") > 0
        assert 0 < accepted <= drafts
        text = server.get("/metrics").text
        per_pos = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("compiled_llm:spec_decode_num_accepted_tokens_per_pos_total{")
        ]
        assert len(per_pos) == 3 and sum(per_pos) == accepted
        assert per_pos[0] >= per_pos[1] >= per_pos[2]  # a draft is kept only after the earlier
        body["structured_outputs"] = {"regex": "[A-F]{1,12}"}  # tokens 49-54 of the 64
        r = server.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert re.fullmatch("[A-F]{1,12}", choice["text"]) and choice["finish_reason"] == "stop"
    finally:
        server.stop()
