"""A completion request as engine jobs: its prompts checked, templated and tokenized, each with its
sampling params. What could take long runs in the prep threads, after the checks that cost nothing.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass

import anyio

from loramux.engine.sampling_params import SamplingParams
from loramux.engine.structured import Grammar, GrammarError
from loramux.server.errors import APIError
from loramux.server.protocol import MAX_CHOICES, ChatCompletionRequest, CompletionRequest
from loramux.server.state import ServerState
from loramux.server.tool_calls import ToolCallFormat

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
    prompt_text: str | None = None   # echo: the prompt as it leads the choices' text


@dataclass
class Prepared:
    """A request as the engine runs it (jobs) and as the answer must be shaped."""
    jobs: list[Job]
    tool_format: ToolCallFormat | None = None    # forced tool calls: the answer becomes `tool_calls`
    echo: bool = False                           # completions: the prompt leads each choice's text
    generate: bool = True                        # False: max_tokens 0 with echo, the prompt alone


def _sampling(state: ServerState, req, prompt_ids: list[int], max_tokens: int | None, logprobs: int | None,
              num_prefix: int, grammar: Grammar | None) -> SamplingParams:
    limit = state.engine.engine.max_model_len - len(prompt_ids) - num_prefix
    try:
        params = req.sampling_params(max_tokens if max_tokens is not None else max(limit, 1), logprobs, grammar)
        state.engine.engine.check_params(params)
        state.engine.engine.check_prompt(prompt_ids, params.max_tokens, num_prefix)
    except ValueError as exc:
        code = "context_length_exceeded" if "context length" in str(exc) else "invalid_value"
        field = str(exc).split(" ", 1)[0]
        raise APIError(400, str(exc), param=field if field in type(req).model_fields else _prompt_param(req),
                       code=code) from None
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
        text = state.tokenizer.apply_chat_template(req.template_messages(), tools=req.template_tools(),
                                                   tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - jinja templates raise on conversations they do not accept
        raise APIError(400, f"the messages do not fit the model's chat template: {exc}", param="messages",
                       code="invalid_value") from None
    _check_fits(state, req, text, max_tokens, num_prefix)
    return _encode(state, text, "messages", add_special_tokens=False)


def _prepare(state: ServerState, req, prompts: list[str | list[int]], max_tokens: int | None, logprobs: int | None,
             num_prefix: int, grammar: Grammar | None) -> list[tuple[list[int], SamplingParams, str | None]]:
    """Templating and tokenizing, one prompt after another so the first that does not fit stops the rest
    (and, for echo, each prompt's text)."""
    if isinstance(req, ChatCompletionRequest):
        ids = chat_prompt_ids(state, req, max_tokens, num_prefix)
        return [(ids, _sampling(state, req, ids, max_tokens, logprobs, num_prefix, grammar), None)]
    out = []
    for prompt in prompts:
        ids = _encode(state, prompt, "prompt") if isinstance(prompt, str) else list(prompt)
        text = (prompt if isinstance(prompt, str) else state.tokenizer.decode(ids)) if req.echo else None
        out.append((ids, _sampling(state, req, ids, max_tokens, logprobs, num_prefix, grammar), text))
    return out


async def _grammar(state: ServerState, req) -> tuple[Grammar | None, ToolCallFormat | None]:
    """The request's structured output compiled (once per spec: cached; in a prep thread, never on the
    event loop or the engine thread), and its forced tool call; a 400 naming what is invalid."""
    tool_format = req.forced_tool_call() if isinstance(req, ChatCompletionRequest) else None
    asked = req.grammar_request()
    if tool_format is not None and asked is not None:
        raise APIError(400, f"a forced tool call and {asked[1]} cannot be combined", param=asked[1],
                       code="invalid_value")
    spec, param = (tool_format.grammar, "tools") if tool_format is not None else asked or (None, None)
    if spec is None:
        return None, None
    compiler = state.engine.engine.grammars
    try:
        grammar = compiler.cached(spec) or await anyio.to_thread.run_sync(compiler.compile, spec,
                                                                          limiter=state.prep_limiter)
    except GrammarError as exc:
        raise APIError(400, f"{param}: {exc}", param=param, code="invalid_value") from None
    return grammar, tool_format


async def build_jobs(state: ServerState, req: CompletionRequest | ChatCompletionRequest, adapter_id: str | None
                     ) -> Prepared:
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
        # max_tokens 0 (echo): one token is generated and dropped, as vLLM does.
        max_tokens, logprobs = (1 if req.max_tokens == 0 else req.max_tokens), req.logprobs
        size = sum(len(p) for p in prompts)
    num_prompts = len(prompts) or 1
    if num_prompts * req.n > MAX_CHOICES:
        raise APIError(400, f"{num_prompts} prompts x n={req.n} exceeds {MAX_CHOICES} choices per request",
                       param="n", code="invalid_value")
    for prompt in prompts:
        _check_fits(state, req, prompt, max_tokens, num_prefix)
    grammar, tool_format = await _grammar(state, req)
    if size <= PREPARE_INLINE_CHARS:
        prepared = _prepare(state, req, prompts, max_tokens, logprobs, num_prefix, grammar)
    else:
        prepared = await anyio.to_thread.run_sync(_prepare, state, req, prompts, max_tokens, logprobs, num_prefix,
                                                  grammar, limiter=state.prep_limiter)
    echo = isinstance(req, CompletionRequest) and req.echo
    return Prepared([Job(f"{base}-{i}", ids, params, req.n, i * req.n, text)
                     for i, (ids, params, text) in enumerate(prepared)],
                    tool_format, echo, not (echo and req.max_tokens == 0))
