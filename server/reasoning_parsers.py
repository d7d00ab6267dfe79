"""Reasoning parsers by name (vLLM's `--reasoning-parser`): split a model's thinking, between
`<think>` and `</think>`, into `reasoning_content`, and the rest into `content`."""

from __future__ import annotations

from dataclasses import dataclass

START, END = "<think>", "</think>"


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag` (held back while streaming)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


@dataclass(frozen=True)
class ReasoningParser:
    """`implicit_start`: the chat template already opened `<think>` (DeepSeek-R1), so text
    before `</think>` is reasoning even without the opening tag; otherwise (Qwen3) only a
    response that opens with `<think>` has reasoning (thinking can be switched off)."""

    implicit_start: bool

    def split(self, text: str, finished: bool = True) -> tuple[str | None, str]:
        """(reasoning or None, content) of the text so far; while streaming (`finished`
        False), a partial tag at the end is left out of both."""
        body = text.lstrip()
        if not finished and START.startswith(body):
            return None, ""  # may still become <think>
        opened = body.startswith(START)
        if not opened and not self.implicit_start:
            return None, text
        if opened:
            body = body[len(START) :]
        end = body.find(END)
        if end >= 0:
            return body[:end], body[end + len(END) :].lstrip("\n")
        hold = 0 if finished else _partial_suffix(body, END)
        return body[: len(body) - hold], ""


_PARSERS = {
    "qwen3": ReasoningParser(implicit_start=False),
    "deepseek_r1": ReasoningParser(implicit_start=True),
}


def reasoning_parser_names() -> tuple[str, ...]:
    return tuple(_PARSERS)


def get_reasoning_parser(name: str) -> ReasoningParser:
    if name not in _PARSERS:
        raise ValueError(f"reasoning_parser must be one of {', '.join(_PARSERS)}, got {name!r}")
    return _PARSERS[name]
