"""The request path of /v1/completions and /v1/chat/completions.

request body -> (prompt token ids, sampling params, adapter) per choice group -> engine ->
one JSON response, or SSE chunks in OpenAI's format.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from loramux.engine.async_engine import EngineDeadError, QueueFullError, RequestFailedError
from loramux.engine.llm_engine import StepOutput
from loramux.engine.sampling_params import SamplingParams
from loramux.server.errors import APIError, error_body
from loramux.server.protocol import MAX_CHOICES, ChatCompletionRequest, CompletionRequest
from loramux.server.state import ServerState

# Prompts up to this many characters (ids) are prepared on the event loop: well under a millisecond,
# less than handing them to a thread, and never queued behind another request's long preparation.
PREPARE_INLINE_CHARS = 4096


@dataclass
class Job:
    """One prompt with its n choices, run as one engine request."""
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    n: int
    first_index: int                 # choice index of this job's first choice in the response


@dataclass
class Choice:
    text: str = ""
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    completion_tokens: int = 0


def _sampling(state: ServerState, req, prompt_ids: list[int], max_tokens: int | None, logprobs: int | None,
              num_prefix: int) -> SamplingParams:
    limit = state.engine.engine.max_model_len - len(prompt_ids) - num_prefix
    try:
        params = req.sampling_params(max_tokens if max_tokens is not None else max(limit, 1), logprobs)
        state.engine.engine.check_prompt(prompt_ids, params.max_tokens, num_prefix)
    except ValueError as exc:
        code = "context_length_exceeded" if "context length" in str(exc) else "invalid_value"
        raise APIError(400, str(exc), param=_prompt_param(req), code=code) from None
    return params


def _prompt_param(req) -> str:
    return "messages" if isinstance(req, ChatCompletionRequest) else "prompt"


def _check_fits(state: ServerState, req, prompt: str | list[int], max_tokens: int | None, num_prefix: int) -> None:
    """Refuse a prompt that cannot fit the context window before tokenizing it (server/token_bound.py)."""
    if isinstance(prompt, str):
        at_least, what = state.token_bound.min_tokens(prompt), f"{len(prompt)} characters, at least"
    else:
        at_least, what = len(prompt), "token ids:"
    total = num_prefix + at_least + (max_tokens or 1)
    window = state.engine.engine.max_model_len
    if total > window:
        raise APIError(400, f"This model's maximum context length is {window} tokens. However, you requested at "
                            f"least {total} tokens (the prompt's {what} {at_least} tokens). Please reduce the length "
                            f"of the prompt or the completion.", param=_prompt_param(req),
                       code="context_length_exceeded")


def _encode(state: ServerState, text: str, param: str, **kwargs) -> list[int]:
    try:
        return state.tokenizer(text, **kwargs)["input_ids"]
    except (TypeError, ValueError):
        # JSON may carry lone surrogates ("\ud800"), which are not text the tokenizer can encode.
        raise APIError(400, f"`{param}` is not valid Unicode text (lone surrogate?)", param=param,
                       code="invalid_value") from None


def chat_prompt_ids(state: ServerState, req: ChatCompletionRequest, max_tokens: int | None = None,
                    num_prefix: int = 0) -> list[int]:
    try:
        text = state.tokenizer.apply_chat_template(req.template_messages(), tokenize=False,
                                                   add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - jinja templates raise on conversations they do not accept
        raise APIError(400, f"the messages do not fit the model's chat template: {exc}", param="messages",
                       code="invalid_value") from None
    _check_fits(state, req, text, max_tokens, num_prefix)
    return _encode(state, text, "messages", add_special_tokens=False)


def _prepare(state: ServerState, req, prompts: list[str | list[int]], max_tokens: int | None, logprobs: int | None,
             num_prefix: int) -> list[tuple[list[int], SamplingParams]]:
    """Templating and tokenizing, one prompt after another so the first that does not fit stops the rest."""
    if isinstance(req, ChatCompletionRequest):
        ids = chat_prompt_ids(state, req, max_tokens, num_prefix)
        return [(ids, _sampling(state, req, ids, max_tokens, logprobs, num_prefix))]
    out = []
    for prompt in prompts:
        ids = _encode(state, prompt, "prompt") if isinstance(prompt, str) else list(prompt)
        out.append((ids, _sampling(state, req, ids, max_tokens, logprobs, num_prefix)))
    return out


async def build_jobs(state: ServerState, req: CompletionRequest | ChatCompletionRequest, adapter_id: str | None
                     ) -> list[Job]:
    """One Job per prompt. What could take long (a chat template, tokenizing, a long list of ids) runs
    in the prep threads, after the checks that cost nothing: a hostile prompt never holds the event loop."""
    num_prefix = state.num_prefix_tokens(adapter_id)
    base = uuid.uuid4().hex
    if isinstance(req, ChatCompletionRequest):
        prompts: list[str | list[int]] = []
        max_tokens = req.max_completion_tokens or req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        size = sum(len(m.content or "") for m in req.messages)
    else:
        prompts = req.prompts()
        max_tokens, logprobs = req.max_tokens, req.logprobs
        size = sum(len(p) for p in prompts)
    num_prompts = len(prompts) or 1
    if num_prompts * req.n > MAX_CHOICES:
        raise APIError(400, f"{num_prompts} prompts x n={req.n} exceeds {MAX_CHOICES} choices per request",
                       param="n", code="invalid_value")
    for prompt in prompts:
        _check_fits(state, req, prompt, max_tokens, num_prefix)
    if size <= PREPARE_INLINE_CHARS:
        prepared = _prepare(state, req, prompts, max_tokens, logprobs, num_prefix)
    else:
        prepared = await anyio.to_thread.run_sync(_prepare, state, req, prompts, max_tokens, logprobs, num_prefix,
                                                  limiter=state.prep_limiter)
    return [Job(f"{base}-{i}", ids, params, req.n, i * req.n) for i, (ids, params) in enumerate(prepared)]


async def _merged(state: ServerState, jobs: list[Job], adapter_id: str | None, deadline: float | None = None
                  ) -> AsyncIterator[tuple[Job, StepOutput]]:
    """Run every job concurrently and yield their outputs as they come.

    Past `deadline` (time.monotonic()) raise a 408: leaving aborts the jobs in the engine.
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(job: Job) -> None:
        try:
            async for out in state.engine.generate(job.request_id, job.prompt_token_ids, job.params, adapter_id,
                                                   job.n):
                await queue.put((job, out))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put(exc)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(job)) for job in jobs]
    live = len(tasks)
    try:
        while live:
            if deadline is None:
                item = await queue.get()
            else:
                try:
                    item = await asyncio.wait_for(queue.get(), max(deadline - time.monotonic(), 0))
                except asyncio.TimeoutError:
                    raise APIError(408, f"the request exceeded the server's time limit of "
                                        f"{state.request_timeout:g} s", code="request_timeout") from None
            if item is None:
                live -= 1
            elif isinstance(item, BaseException):
                raise item
            elif item[1].error is not None:
                raise APIError(item[1].error_status, item[1].error,
                               code="model_not_found" if item[1].error_status == 404 else "engine_error")
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()                # leaving early aborts the engine requests (see AsyncEngine)


def _engine_error(exc: BaseException) -> APIError:
    if isinstance(exc, QueueFullError):
        return APIError(503, "the server is overloaded; retry later", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), code="engine_error")
    if isinstance(exc, RequestFailedError):
        return APIError(500, str(exc), code="engine_error")
    return APIError(500, f"internal error: {exc!r}")


class Responder:
    """Formats engine outputs as OpenAI completion or chat objects."""

    def __init__(self, state: ServerState, req, model: str, jobs: list[Job]) -> None:
        self.state, self.req, self.model, self.jobs = state, req, model, jobs
        self.chat = isinstance(req, ChatCompletionRequest)
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if self.chat else "text_completion"

    def token_text(self, token_id: int) -> str:
        return self.state.tokenizer.decode([token_id])

    def logprobs_obj(self, entries: list) -> dict | None:
        if not entries:
            return None
        if self.chat:
            def item(tok: int, lp: float) -> dict:
                s = self.token_text(tok)
                return {"token": s, "logprob": lp, "bytes": list(s.encode())}
            return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                                for e in entries]}
        return {"tokens": [self.token_text(e.token_id) for e in entries],
                "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{self.token_text(t): lp for t, lp in e.top} for e in entries],
                "text_offset": []}

    def choice_obj(self, index: int, text: str, finish_reason: str | None, logprobs: list, delta: bool,
                   first: bool = False) -> dict:
        lp = self.logprobs_obj(logprobs)
        if not self.chat:
            return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason}
        if delta:
            msg = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return {"index": index, "delta": msg, "logprobs": lp, "finish_reason": finish_reason}
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                "finish_reason": finish_reason}

    def usage(self, choices: dict[int, Choice]) -> dict:
        prompt = sum(len(j.prompt_token_ids) for j in self.jobs)
        completion = sum(c.completion_tokens for c in choices.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def envelope(self, choices: list[dict], usage: dict | None = None, chunk: bool = False) -> dict:
        obj = {"id": self.id, "object": self.object + (".chunk" if chunk and self.chat else ""),
               "created": self.created, "model": self.model, "choices": choices}
        if usage is not None or not chunk:
            obj["usage"] = usage
        return obj


async def run_request(state: ServerState, req: CompletionRequest | ChatCompletionRequest, endpoint: str,
                      request: Request | None = None):
    """Answer one completion request; `request` (the HTTP request) lets a client's hang-up abort it."""
    deadline = time.monotonic() + state.request_timeout if state.request_timeout else None
    if req.adapters is not None:  # a per-request mixture, merged on first use (off the event loop)
        model, adapter_id = await run_in_threadpool(state.resolve_mixture, req)
    else:
        model, adapter_id = state.resolve_model(req.adapter_id or req.model)
    jobs = await build_jobs(state, req, adapter_id)
    try:
        state.engine.check_accepting()
    except (QueueFullError, EngineDeadError) as exc:
        raise _engine_error(exc) from None
    responder = Responder(state, req, model, jobs)
    tracker = state.track(model, endpoint, sum(len(j.prompt_token_ids) for j in jobs))
    if req.stream:
        return StreamingResponse(_stream(state, responder, jobs, adapter_id, tracker, deadline),
                                 media_type="text/event-stream")
    work = asyncio.ensure_future(_collect(state, jobs, adapter_id, tracker, deadline))
    if not await _finished_before_hangup(request, work):
        tracker.done("cancelled")
        return Response(status_code=499)     # nginx's "client closed request"; nobody reads it
    choices = work.result()
    body = responder.envelope([responder.choice_obj(i, c.text, c.finish_reason, c.logprobs, delta=False)
                               for i, c in sorted(choices.items())], responder.usage(choices))
    return JSONResponse(body)


async def _collect(state: ServerState, jobs: list[Job], adapter_id: str | None, tracker,
                   deadline: float | None) -> dict[int, Choice]:
    """Run the jobs to the end and gather each choice (the non-streaming answer)."""
    choices: dict[int, Choice] = {}
    try:
        async with aclosing(_merged(state, jobs, adapter_id, deadline)) as outputs:
            async for job, out in outputs:
                tracker.on_token(out)
                c = choices.setdefault(job.first_index + out.index, Choice())
                c.text += out.text_delta
                c.completion_tokens = out.completion_tokens
                if out.logprob is not None:
                    c.logprobs.append(out.logprob)
                if out.finished:
                    c.finish_reason = out.finish_reason
    except (QueueFullError, EngineDeadError, RequestFailedError) as exc:
        tracker.done("error")
        raise _engine_error(exc) from None
    except APIError as exc:
        tracker.done("timeout" if exc.status == 408 else "error")
        raise
    tracker.done("ok")
    return choices


async def _finished_before_hangup(request: Request | None, work: asyncio.Future) -> bool:
    """Wait for `work`; if the client disconnects first, cancel it (aborting its engine requests).

    Starlette notices a hang-up only while it streams a response, so a non-streaming request
    listens for uvicorn's `http.disconnect` itself. Its body is already read, so this consumes
    nothing else; the listener stops as soon as the work is done.
    """
    if request is None:
        await work
        return True
    hangup = asyncio.ensure_future(_hangup(request))
    try:
        await asyncio.wait({work, hangup}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hangup.cancel()
        if not work.done():          # client gone, or this handler itself cancelled
            work.cancel()
    if work.done() and not work.cancelled():
        return True
    await asyncio.wait({work})       # let the cancellation run its cleanup before answering
    if not work.cancelled():
        work.exception()             # retrieved: it no longer matters, nobody is listening
    return False


async def _hangup(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


async def _stream(state: ServerState, r: Responder, jobs: list[Job], adapter_id: str | None, tracker,
                  deadline: float | None = None) -> AsyncIterator[bytes]:
    choices: dict[int, Choice] = {}
    status = "cancelled"
    try:
        if r.chat:   # OpenAI's first chat chunk carries the role for every choice
            for job in jobs:
                for i in range(job.n):
                    yield _sse(r.envelope([r.choice_obj(job.first_index + i, "", None, [], delta=True, first=True)],
                                          chunk=True))
        # aclosing: a client that hangs up closes this generator, and with it the engine requests.
        async with aclosing(_merged(state, jobs, adapter_id, deadline)) as outputs:
            async for job, out in outputs:
                tracker.on_token(out)
                index = job.first_index + out.index
                c = choices.setdefault(index, Choice())
                c.completion_tokens = out.completion_tokens
                if out.text_delta or out.finished or out.logprob is not None:
                    lps = [out.logprob] if out.logprob is not None else []
                    yield _sse(r.envelope([r.choice_obj(index, out.text_delta,
                                                        out.finish_reason if out.finished else None, lps, delta=True)],
                                          chunk=True))
        req = r.req
        if req.stream_options is not None and req.stream_options.include_usage:
            yield _sse(r.envelope([], r.usage(choices), chunk=True))
        yield _sse("[DONE]")
        status = "ok"
    except (QueueFullError, EngineDeadError, RequestFailedError, APIError) as exc:
        err = exc if isinstance(exc, APIError) else _engine_error(exc)
        status = "timeout" if err.status == 408 else "error"
        yield _sse(error_body(err.status, err.message, err.param, err.code))   # the status line is long sent
    finally:
        tracker.done(status)
