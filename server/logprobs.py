"""Logprobs in the two OpenAI shapes, and the per-choice cursor that turns cumulative outputs
into stream deltas."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from compiled_llm.outputs import CompletionOutput, Logprob, PromptLogprobs

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


def _completion_body(
    items: Sequence[tuple[str, dict[int, Logprob] | None, int]], k: int, offset: int
) -> tuple[dict[str, Any], int]:
    """/v1/completions logprobs of (text, entry, token id) items; an item without an entry (an
    echoed prompt's first token) gets null logprob and top_logprobs, as in OpenAI's echo."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []
    for text, entry, token_id in items:
        tokens.append(text)
        text_offset.append(offset)
        offset += len(text)
        if entry is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        own = entry[token_id]
        token_logprobs.append(_value(own))
        top = {lp.decoded_token or "": _value(lp) for lp in _top(entry, k)}
        top.setdefault(text, _value(own))
        top_logprobs.append(top)
    body = {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }
    return body, offset


def completion_logprobs(
    c: CompletionOutput, start: int, k: int, offset: int
) -> tuple[dict[str, Any], int]:
    """/v1/completions logprobs of tokens[start:], and the text offset after them."""
    items = [
        (entry[token_id].decoded_token or "", entry, token_id)
        for token_id, entry in zip(c.token_ids[start:], (c.logprobs or [])[start:])
    ]
    return _completion_body(items, k, offset)


def echo_logprobs(
    prompt_token_ids: list[int], prompt_logprobs: PromptLogprobs, first_text: str, k: int
) -> dict[str, Any]:
    """/v1/completions logprobs of an echoed prompt (from RequestOutput.prompt_logprobs);
    `first_text` is its first token's text, which no entry carries."""
    items: list[tuple[str, dict[int, Logprob] | None, int]] = [
        (first_text, None, prompt_token_ids[0])
    ]
    for token_id, entry in zip(prompt_token_ids[1:], prompt_logprobs[1:], strict=True):
        assert entry is not None, "every prompt token after the first has logprobs"
        items.append((entry[token_id].decoded_token or "", entry, token_id))
    return _completion_body(items, k, 0)[0]


def json_prompt_logprobs(prompt_logprobs: PromptLogprobs) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs` field of a choice: per prompt token, null or {token id:
    {logprob, rank, decoded_token}}."""
    return [
        None
        if entry is None
        else {
            str(tid): {"logprob": _value(lp), "rank": lp.rank, "decoded_token": lp.decoded_token}
            for tid, lp in entry.items()
        }
        for entry in prompt_logprobs
    ]


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
