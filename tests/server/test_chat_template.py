"""--chat-template (vLLM's): the server renders chat prompts with the operator's template
instead of the tokenizer's; a value that is neither a file nor a template, or a template that
does not parse, stops the command before anything loads (exit status 2)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.conftest import Server, start_server

TEMPLATE = (
    "{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<<assistant>> {% endif %}"
)
MESSAGES = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_models) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("chat-template")
    (tmp / "template.jinja").write_text(TEMPLATE)
    s = start_server(
        tmp / "server.log",
        "--chat-template",
        str(tmp / "template.jinja"),
        model=str(tiny_models("llama")),
    )
    yield s
    s.kill()


def test_prompts_rendered_with_the_servers_template(server: Server, tiny_models) -> None:
    """Oracle: transformers' apply_chat_template of the same messages with the template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models("llama"))
    for add in (True, False):
        body = {"messages": MESSAGES, "add_generation_prompt": add}
        got = server.post("/tokenize", json=body)
        assert got.status_code == 200, got.text
        want = tokenizer.apply_chat_template(
            MESSAGES, chat_template=TEMPLATE, add_generation_prompt=add, tokenize=False
        )
        assert got.json()["tokens"] == tokenizer.encode(want, add_special_tokens=False)
        default = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=add, tokenize=False)
        assert default != want  # the tokenizer's own template renders something else
    r = server.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    ("value", "message"),
    [("no/such/file.jinja", "neither a file nor"), ("{% for x in %}", "--chat-template: ")],
)
def test_bad_value_stops_the_command(value: str, message: str, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "compiled_llm.cli", "serve", "--chat-template", value]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 2 and message in run.stderr, run.stderr[-2000:]
