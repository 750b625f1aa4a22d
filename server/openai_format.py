"""OpenAI's response objects: completion and chat choices, logprobs, usage, envelopes, SSE framing.

No engine and no HTTP here: a Responder turns what the request path gathered (server/completions.py)
into the dicts OpenAI's clients parse, one per response or per streamed chunk.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loramux.server.errors import APIError, error_body

if TYPE_CHECKING:
    from loramux.engine.sequence import TokenLogprob

SSE_DONE = "[DONE]"


@dataclass
class Choice:
    """One choice as the engine's outputs accumulate (its text only when not streaming)."""
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    completion_tokens: int = 0


def sse(obj: dict | str) -> bytes:
    """One server-sent event: `data: <json>` (or `data: [DONE]`) and a blank line."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


def sse_error(err: APIError) -> bytes:
    """An error met after the stream's 200 went out: the last event, in OpenAI's error shape."""
    return sse(error_body(err.status, err.message, err.param, err.code))


class Responder:
    """Formats one request's outputs as OpenAI completion (`chat=False`) or chat completion objects."""

    def __init__(self, tokenizer: Any, chat: bool, model: str, prompt_tokens: int) -> None:
        self.tokenizer, self.chat, self.model, self.prompt_tokens = tokenizer, chat, model, prompt_tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self._text_offsets: dict[int, int] = {}      # completion logprobs: characters so far, per choice

    # -- logprobs ---------------------------------------------------------------------------------
    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def logprobs_obj(self, index: int, entries: list[TokenLogprob]) -> dict | None:
        if not entries:
            return None
        return self.chat_logprobs(entries) if self.chat else self.completion_logprobs(index, entries)

    def chat_logprobs(self, entries: list[TokenLogprob]) -> dict:
        """`{"content": [{token, logprob, bytes, top_logprobs}]}`."""
        def item(token_id: int, logprob: float) -> dict:
            text = self.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
        return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                            for e in entries]}

    def completion_logprobs(self, index: int, entries: list[TokenLogprob]) -> dict:
        """The legacy shape: parallel lists `tokens`, `token_logprobs`, `top_logprobs` (token -> logprob)
        and `text_offset` (each token's first character in the choice's text, counted across chunks)."""
        tokens = [self.token_text(e.token_id) for e in entries]
        offsets, at = [], self._text_offsets.get(index, 0)
        for text in tokens:
            offsets.append(at)
            at += len(text)
        self._text_offsets[index] = at
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{self.token_text(t): lp for t, lp in e.top} for e in entries],
                "text_offset": offsets}

    # -- choices and envelopes --------------------------------------------------------------------
    def choice_obj(self, index: int, text: str, finish_reason: str | None, logprobs: list[TokenLogprob],
                   delta: bool, first: bool = False) -> dict:
        lp = self.logprobs_obj(index, logprobs)
        if not self.chat:
            return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason}
        if delta:
            msg = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return {"index": index, "delta": msg, "logprobs": lp, "finish_reason": finish_reason}
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                "finish_reason": finish_reason}

    def usage(self, choices: dict[int, Choice]) -> dict:
        completion = sum(c.completion_tokens for c in choices.values())
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def envelope(self, choices: list[dict], usage: dict | None = None, chunk: bool = False) -> dict:
        obj = {"id": self.id, "object": self.object + (".chunk" if chunk and self.chat else ""),
               "created": self.created, "model": self.model, "choices": choices}
        if usage is not None or not chunk:
            obj["usage"] = usage
        return obj

    # -- whole answers and stream events ----------------------------------------------------------
    def response(self, choices: dict[int, Choice]) -> dict:
        """The non-streaming answer: every choice, in index order, and the usage."""
        return self.envelope([self.choice_obj(i, c.text, c.finish_reason, c.logprobs, delta=False)
                              for i, c in sorted(choices.items())], self.usage(choices))

    def role_event(self, index: int) -> bytes:
        """A chat stream's first chunk for a choice: OpenAI's carries the assistant role."""
        return sse(self.envelope([self.choice_obj(index, "", None, [], delta=True, first=True)], chunk=True))

    def delta_event(self, index: int, text: str, finish_reason: str | None, logprobs: list[TokenLogprob]) -> bytes:
        return sse(self.envelope([self.choice_obj(index, text, finish_reason, logprobs, delta=True)], chunk=True))

    def usage_event(self, choices: dict[int, Choice]) -> bytes:
        """`stream_options.include_usage`: a last chunk with no choices and the usage."""
        return sse(self.envelope([], self.usage(choices), chunk=True))
