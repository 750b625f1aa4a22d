"""A completion request as engine jobs: its prompts checked, templated and tokenized, each with its
sampling params. What could take long runs in the prep threads, after the checks that cost nothing.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass

import anyio

from loramux.engine.sampling_params import SamplingParams
from loramux.server.errors import APIError
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
