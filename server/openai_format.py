"""OpenAI's response objects: completion and chat choices, logprobs (and vLLM's prompt_logprobs),
tool calls, usage, envelopes, SSE framing.

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
from loramux.server.tool_calls import ToolCallFormat, argument_delta, stream_calls

if TYPE_CHECKING:
    from loramux.engine.sequence import TokenLogprob

SSE_DONE = "[DONE]"
LOGPROB_FLOOR = -9999.0     # what -inf (a token a grammar forbids) is sent as: JSON has no infinity (vLLM's choice)


@dataclass
class Choice:
    """One choice as the engine's outputs accumulate (its text only when not streaming)."""
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None    # echo / prompt_logprobs: first entry None
    prompt_ids: list[int] = field(default_factory=list)


def sse(obj: dict | str) -> bytes:
    """One server-sent event: `data: <json>` (or `data: [DONE]`) and a blank line."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


def sse_error(err: APIError) -> bytes:
    """An error met after the stream's 200 went out: the last event, in OpenAI's error shape."""
    return sse(error_body(err.status, err.message, err.param, err.code))


def _finite(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


class Responder:
    """Formats one request's outputs as OpenAI completion (`chat=False`) or chat completion objects."""

    def __init__(self, tokenizer: Any, chat: bool, model: str, prompt_tokens: int,
                 tool_format: ToolCallFormat | None = None) -> None:
        self.tokenizer, self.chat, self.model, self.prompt_tokens = tokenizer, chat, model, prompt_tokens
        self.tool_format = tool_format
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self._text_offsets: dict[int, int] = {}      # completion logprobs: characters so far, per choice

    # -- logprobs ---------------------------------------------------------------------------------
    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def logprobs_obj(self, index: int, entries: list[TokenLogprob | None]) -> dict | None:
        if not entries:
            return None
        return self.chat_logprobs(entries) if self.chat else self.completion_logprobs(index, entries)

    def chat_logprobs(self, entries: list[TokenLogprob]) -> dict:
        """`{"content": [{token, logprob, bytes, top_logprobs}]}`."""
        def item(token_id: int, logprob: float) -> dict:
            text = self.token_text(token_id)
            return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode())}
        return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                            for e in entries]}

    def completion_logprobs(self, index: int, entries: list[TokenLogprob | None]) -> dict:
        """The legacy shape: parallel lists `tokens`, `token_logprobs`, `top_logprobs` (token -> logprob:
        the top k and the chosen token, as OpenAI and vLLM give them) and `text_offset` (each token's
        first character in the choice's text, counted across chunks). An echoed prompt's first token
        has no logprob: null in `token_logprobs` and `top_logprobs`."""
        tokens = [self.token_text(e.token_id) for e in entries]
        offsets, at = [], self._text_offsets.get(index, 0)
        for text in tokens:
            offsets.append(at)
            at += len(text)
        self._text_offsets[index] = at
        top = [None if e.logprob is None else
               {**{self.token_text(t): _finite(lp) for t, lp in e.top}, text: _finite(e.logprob)}
               for e, text in zip(entries, tokens)]
        return {"tokens": tokens, "token_logprobs": [None if e.logprob is None else _finite(e.logprob)
                                                     for e in entries],
                "top_logprobs": top, "text_offset": offsets}

    def prompt_logprobs_obj(self, entries: list[TokenLogprob | None] | None) -> list | None:
        """vLLM's `prompt_logprobs`: per prompt token, None for the first, else {token id: {logprob,
        rank, decoded_token}} for the token itself and the top k."""
        if entries is None:
            return None
        out: list[dict | None] = []
        for e in entries:
            if e is None or e.logprob is None:
                out.append(None)
                continue
            ranked = {t: (lp, r) for r, (t, lp) in enumerate(e.top, 1)}
            ranked[e.token_id] = (e.logprob, e.rank)
            out.append({str(t): {"logprob": _finite(lp), "rank": r, "decoded_token": self.token_text(t)}
                        for t, (lp, r) in ranked.items()})
        return out

    # -- choices and envelopes --------------------------------------------------------------------
    def choice_obj(self, index: int, text: str, finish_reason: str | None, logprobs: list[TokenLogprob | None],
                   delta: bool, first: bool = False, prompt_logprobs: list | None = None) -> dict:
        lp = self.logprobs_obj(index, logprobs)
        if not self.chat:
            choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason}
            if prompt_logprobs is not None:
                choice["prompt_logprobs"] = self.prompt_logprobs_obj(prompt_logprobs)
            return choice
        if delta:
            msg = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return {"index": index, "delta": msg, "logprobs": lp, "finish_reason": finish_reason}
        if self.tool_format is not None:
            msg, finish_reason = self.tool_format.message(text, finish_reason)
        else:
            msg = {"role": "assistant", "content": text}
        return {"index": index, "message": msg, "logprobs": lp, "finish_reason": finish_reason}

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
        """The non-streaming answer: every choice, in index order, and the usage (and, for chat, vLLM's
        response-level prompt_logprobs)."""
        ordered = sorted(choices.items())
        obj = self.envelope([self.choice_obj(i, c.text, c.finish_reason, c.logprobs, delta=False,
                                             prompt_logprobs=None if self.chat else c.prompt_logprobs)
                             for i, c in ordered], self.usage(choices))
        if self.chat and ordered and ordered[0][1].prompt_logprobs is not None:
            obj["prompt_logprobs"] = self.prompt_logprobs_obj(ordered[0][1].prompt_logprobs)
        return obj

    def role_event(self, index: int) -> bytes:
        """A chat stream's first chunk for a choice: OpenAI's carries the assistant role (and a forced
        named call's id and name)."""
        choice = self.choice_obj(index, "", None, [], delta=True, first=True)
        opening = self.tool_format.first_delta() if self.tool_format is not None else None
        if opening is not None:
            choice["delta"] = {"role": "assistant", "content": None, "tool_calls": opening}
        return sse(self.envelope([choice], chunk=True))

    def delta_event(self, index: int, text: str, finish_reason: str | None, logprobs: list[TokenLogprob | None],
                    prompt_logprobs: list | None = None) -> bytes:
        choice = self.choice_obj(index, text, finish_reason, logprobs, delta=True, prompt_logprobs=prompt_logprobs)
        if self.chat and self.tool_format is not None:
            choice["delta"] = {"tool_calls": argument_delta(text)} if text else {}
        return sse(self.envelope([choice], chunk=True))

    def tool_calls_event(self, index: int, text: str, finish_reason: str | None) -> bytes | None:
        """"required" calls, streamed whole once the array is complete (None: not a "required" stream)."""
        if self.tool_format is None or self.tool_format.function is not None:
            return None
        calls = self.tool_format.calls(text, finish_reason)
        _, finish_reason = self.tool_format.message(text, finish_reason)
        delta = {"tool_calls": stream_calls(calls)} if calls is not None else {"content": text}
        return sse(self.envelope([{"index": index, "delta": delta, "logprobs": None,
                                   "finish_reason": finish_reason}], chunk=True))

    def usage_event(self, choices: dict[int, Choice]) -> bytes:
        """`stream_options.include_usage`: a last chunk with no choices and the usage."""
        return sse(self.envelope([], self.usage(choices), chunk=True))
