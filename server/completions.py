"""The request path of /v1/completions and /v1/chat/completions: jobs -> engine -> one answer or a stream.

A request becomes jobs (server/jobs.py), the jobs run concurrently in the engine, and their
outputs are gathered into one JSON response or streamed as SSE chunks (shapes: server/openai_format.py).
A client that hangs up, or a request past the time limit, aborts its engine requests.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from loramux.engine.async_engine import EngineDeadError, QueueFullError, RequestFailedError
from loramux.engine.llm_engine import StepOutput
from loramux.engine.sequence import TokenLogprob
from loramux.server.errors import APIError
from loramux.server.jobs import Job, Prepared, build_jobs
from loramux.server.openai_format import SSE_DONE, Choice, Responder, sse, sse_error
from loramux.server.protocol import ChatCompletionRequest, CompletionRequest
from loramux.server.state import ServerState


async def run_request(state: ServerState, req: CompletionRequest | ChatCompletionRequest, endpoint: str,
                      request: Request | None = None):
    """Answer one completion request; `request` (the HTTP request) lets a client's hang-up abort it."""
    deadline = time.monotonic() + state.request_timeout if state.request_timeout else None
    if req.adapters is not None:  # a per-request mixture, merged on first use (off the event loop)
        model, adapter_id = await run_in_threadpool(state.resolve_mixture, req)
    elif req.adapter_id:
        model, adapter_id = state.resolve_model(req.adapter_id, param="adapter_id")
    else:
        model, adapter_id = state.resolve_model(req.model)
    prep = await build_jobs(state, req, adapter_id)
    try:
        state.engine.check_accepting()
    except (QueueFullError, EngineDeadError) as exc:
        raise _engine_error(exc) from None
    prompt_tokens = sum(len(j.prompt_token_ids) for j in prep.jobs)
    responder = Responder(state.tokenizer, isinstance(req, ChatCompletionRequest), model, prompt_tokens,
                          prep.tool_format)
    tracker = state.track(model, endpoint, prompt_tokens, mixture=req.adapters is not None)
    if req.stream:
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        return StreamingResponse(_stream(state, responder, prep, adapter_id, tracker, include_usage, deadline),
                                 media_type="text/event-stream")
    work = asyncio.ensure_future(_collect(state, prep, adapter_id, tracker, deadline))
    if not await _finished_before_hangup(request, work):
        tracker.done("cancelled")
        return Response(status_code=499)     # nginx's "client closed request"; nobody reads it
    return JSONResponse(responder.response(work.result()))


def _echoed(job: Job, out: StepOutput, want_logprobs: bool) -> tuple[str, list[TokenLogprob | None]]:
    """echo: the prompt's text and (with logprobs) its tokens' entries, to lead a choice's first output."""
    if job.prompt_text is None:
        return "", []
    entries: list[TokenLogprob | None] = []
    if want_logprobs:
        entries = [TokenLogprob(job.prompt_token_ids[0], None, []), *(out.prompt_logprobs or [])]
    return job.prompt_text, entries


def _first_of_choice(choices: dict[int, Choice], index: int) -> bool:
    return index not in choices


def _prompt_entries(out: StepOutput) -> list[TokenLogprob | None] | None:
    """vLLM's prompt_logprobs of a choice: None for the first prompt token, then each one's entry."""
    return None if out.prompt_logprobs is None else [None, *out.prompt_logprobs]


async def _collect(state: ServerState, prep: Prepared, adapter_id: str | None, tracker,
                   deadline: float | None) -> dict[int, Choice]:
    """Run the jobs to the end and gather each choice (the non-streaming answer)."""
    choices: dict[int, Choice] = {}
    try:
        async with aclosing(_merged(state, prep.jobs, adapter_id, deadline)) as outputs:
            async for job, out in outputs:
                tracker.on_token(out)
                index = job.first_index + out.index
                if _first_of_choice(choices, index):
                    c = choices[index] = Choice(prompt_logprobs=_prompt_entries(out))
                    c.text, c.logprobs = _echoed(job, out, job.params.logprobs is not None)
                c = choices[index]
                if prep.generate:
                    c.text += out.text_delta
                    c.completion_tokens = out.completion_tokens
                    if out.logprob is not None:
                        c.logprobs.append(out.logprob)
                if out.finished:
                    c.finish_reason = out.finish_reason if prep.generate else "length"
    except (QueueFullError, EngineDeadError, RequestFailedError) as exc:
        tracker.done("error")
        raise _engine_error(exc) from None
    except APIError as exc:
        tracker.done("timeout" if exc.status == 408 else "error")
        raise
    tracker.done("ok")
    return choices


async def _stream(state: ServerState, r: Responder, prep: Prepared, adapter_id: str | None, tracker,
                  include_usage: bool, deadline: float | None = None) -> AsyncIterator[bytes]:
    choices: dict[int, Choice] = {}
    status = "cancelled"
    whole_calls = r.tool_format is not None and r.tool_format.function is None   # "required": sent complete
    try:
        if r.chat:   # OpenAI's first chat chunk carries the role for every choice
            for job in prep.jobs:
                for i in range(job.n):
                    yield r.role_event(job.first_index + i)
        # aclosing: a client that hangs up closes this generator, and with it the engine requests.
        async with aclosing(_merged(state, prep.jobs, adapter_id, deadline)) as outputs:
            async for job, out in outputs:
                tracker.on_token(out)
                index = job.first_index + out.index
                text, entries, prompt_lps = "", [], None
                if _first_of_choice(choices, index):
                    text, entries = _echoed(job, out, job.params.logprobs is not None)
                    prompt_lps = _prompt_entries(out)
                c = choices.setdefault(index, Choice())
                finish = (out.finish_reason if prep.generate else "length") if out.finished else None
                if prep.generate:
                    c.completion_tokens = out.completion_tokens
                    text += out.text_delta
                    entries += [out.logprob] if out.logprob is not None else []
                if whole_calls:
                    c.text += text
                    if out.finished:
                        yield r.tool_calls_event(index, c.text, finish)
                elif text or out.finished or entries or prompt_lps is not None:
                    yield r.delta_event(index, text, finish, entries, prompt_lps)
        if include_usage:
            yield r.usage_event(choices)
        yield sse(SSE_DONE)
        status = "ok"
    except (QueueFullError, EngineDeadError, RequestFailedError, APIError) as exc:
        err = exc if isinstance(exc, APIError) else _engine_error(exc)
        status = "timeout" if err.status == 408 else "error"
        yield sse_error(err)         # the status line is long sent
    finally:
        tracker.done(status)


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
                               code={404: "model_not_found", 400: "invalid_value"}.get(item[1].error_status,
                                                                                       "engine_error"))
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
