"""Logprobs in the two OpenAI shapes, and the per-choice cursor that turns cumulative outputs
into stream deltas."""

from __future__ import annotations

from typing import Any

from compiled_llm.outputs import CompletionOutput, Logprob

_FLOOR = -9999.0  # JSON has no -inf


class ChoiceCursor:
    """How much of one choice a stream has sent."""

    def __init__(self) -> None:
        self.prev_text = 0
        self.prev_tokens = 0
        self.offset = 0  # text offset of the next token (completions logprobs)
        self.finished = False

    def advance(self, c: CompletionOutput) -> str | None:
        """The new text, or None when there is nothing to send (no new token, not finished).
        A new token with no text yet (a partial UTF-8 character, a held-back stop string, a
        server without tokenizer) still gets a chunk, so clients see every token's timing."""
        if self.finished:
            return None
        delta = c.text[self.prev_text :]
        if not delta and c.finish_reason is None and len(c.token_ids) == self.prev_tokens:
            return None
        return delta

    def commit(self, c: CompletionOutput) -> None:
        self.prev_text = len(c.text)
        self.prev_tokens = len(c.token_ids)
        self.finished = c.finish_reason is not None


def _value(lp: Logprob) -> float:
    return max(lp.logprob, _FLOOR)


def _top(entry: dict[int, Logprob], k: int) -> list[Logprob]:
    ranked = [lp for lp in entry.values() if lp.rank is not None and lp.rank <= k]
    return sorted(ranked, key=lambda lp: lp.rank or 0)[:k]


def completion_logprobs(
    c: CompletionOutput, start: int, k: int, offset: int
) -> tuple[dict[str, Any], int]:
    """/v1/completions logprobs of tokens[start:], and the text offset after them."""
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []
    for token_id, entry in zip(c.token_ids[start:], (c.logprobs or [])[start:]):
        sampled = entry[token_id]
        text = sampled.decoded_token or ""
        tokens.append(text)
        token_logprobs.append(_value(sampled))
        top = {lp.decoded_token or "": _value(lp) for lp in _top(entry, k)}
        top.setdefault(text, _value(sampled))
        top_logprobs.append(top)
        text_offset.append(offset)
        offset += len(text)
    body = {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }
    return body, offset


def _chat_entry(lp: Logprob) -> dict[str, Any]:
    text = lp.decoded_token or ""
    return {"token": text, "logprob": _value(lp), "bytes": list(text.encode("utf-8"))}


def chat_logprobs(c: CompletionOutput, start: int, k: int) -> dict[str, Any]:
    """/v1/chat/completions logprobs of tokens[start:]."""
    content = []
    for token_id, entry in zip(c.token_ids[start:], (c.logprobs or [])[start:]):
        item = _chat_entry(entry[token_id])
        item["top_logprobs"] = [_chat_entry(lp) for lp in _top(entry, k)]
        content.append(item)
    return {"content": content}
