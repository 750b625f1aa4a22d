"""OpenAI request bodies (pydantic, at the HTTP edge only) and their mapping to SamplingParams.

Strict types (a boolean is not an integer, "yes" is not a boolean), and bounded work: parsed with
`model_validate_json` (server/json_body.py), after the one JSON bound (128 levels of nesting).
The fields a client can make long (`prompt`, message `content`) are checked by plain Python
functions rather than pydantic unions: a union over a million-element list runs as one native
call that holds the GIL for about a second, while Python code lets the event loop take turns
when the body is parsed in a worker thread.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, model_validator

from loramux.adapters_registry.mixtures import MAX_SOURCES
from loramux.engine.sampling_params import MAX_LOGIT_BIAS, MAX_LOGPROBS, SamplingParams
from loramux.engine.structured import Grammar
from loramux.server.errors import FieldError
from loramux.server.structured_request import StructuredFields
from loramux.server.tool_calls import ToolFields

MAX_N = 16
MAX_CHOICES = 128                     # prompts x n in one request: bounds what one request adds to the queue
MAX_MESSAGES = 2048                   # OpenAI's own bound on `messages`
MAX_STOP_TOKEN_IDS = 64
_STRICT = ConfigDict(strict=True)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class AdapterWeight(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    id: str
    weight: float = 1.0


class MixtureFields(BaseModel):
    """A mixture of registered LoRA adapters, merged as peft's add_weighted_adapter would
    (adapters_registry/merge.py): `merge` is linear | task_arithmetic | ties | dare_linear | dare_ties
    (or another peft combination type); `density` is the fraction ties / dare keep; DARE's random
    drop is seeded by `merge_seed` (in a completion request: else its `seed`, else 0)."""
    model_config = _STRICT
    adapters: list[AdapterWeight] | None = Field(None, max_length=MAX_SOURCES)
    merge: str = "linear"
    density: float | None = None
    merge_seed: int | None = None
    majority_sign_method: Literal["total", "frequency"] = "total"

    def recipe_args(self, fallback_seed: int | None = None) -> dict:
        """Keyword arguments of adapters_registry.mixtures.MixtureRecipe.create."""
        return {"adapters": [(a.id, a.weight) for a in self.adapters or []], "method": self.merge,
                "density": self.density, "majority_sign_method": self.majority_sign_method,
                "seed": self.merge_seed if self.merge_seed is not None else fallback_seed}


def _check_stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise ValueError("stop takes a string or a list of up to 4 non-empty strings")
    return stops


def _check_token_ids(value: list[int] | None) -> list[int] | None:
    if value is not None and any(t < 0 for t in value):
        raise ValueError("token ids are not negative")
    return value


def _check_logit_bias(value: Any) -> dict[int, float]:
    """OpenAI's `logit_bias`: {"token id": bias} (JSON keys are strings), bias in [-100, 100]."""
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias takes an object of at most {MAX_LOGIT_BIAS} token ids")
    out = {}
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()) or len(key) > 9:
            raise ValueError(f"logit_bias keys are token ids, not {key[:20]!r}")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise ValueError("logit_bias values are numbers between -100 and 100")
        out[int(key)] = float(bias)
    return out


class _Common(MixtureFields, StructuredFields):  # `adapters` set: a per-request mixture on the base model
    # Unknown OpenAI fields are tolerated, as OpenAI does, and ignored (never turned into objects).
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    adapter_id: str | None = None                # LoRAX-style: names the adapter in the body
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)   # torch generators take 64-bit seeds
    stop: Annotated[Any, PlainValidator(_check_stop, json_schema_input_type=str | list[str] | None)] = None
    ignore_eos: bool = False
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    logit_bias: Annotated[Any, PlainValidator(_check_logit_bias, json_schema_input_type=dict[str, float] | None)] = None
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: Annotated[list[int] | None, AfterValidator(_check_token_ids)] = Field(
        None, max_length=MAX_STOP_TOKEN_IDS)
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    user: str | None = None

    def sampling_params(self, max_tokens: int, logprobs: int | None, grammar: Grammar | None = None) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, min_p=self.min_p, seed=self.seed, stop=list(self.stop or []),
                              stop_token_ids=list(self.stop_token_ids or []),
                              include_stop_str_in_output=self.include_stop_str_in_output,
                              ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              repetition_penalty=self.repetition_penalty, logit_bias=self.logit_bias or {},
                              logprobs=logprobs, prompt_logprobs=self.prompt_logprob_k(), grammar=grammar)

    def prompt_logprob_k(self) -> int | None:
        return self.prompt_logprobs


def _token_ids(value: list) -> bool:
    return set(map(type, value)) <= {int}       # in C: a million ids take milliseconds, not a Python loop


def _check_prompt(value: Any) -> str | list:
    """str | list[str] | list[int] | list[list[int]], non-empty; token ids are JSON integers."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and not value:
        raise ValueError("prompt must not be empty")
    if isinstance(value, list):
        if _token_ids(value):
            return value
        if len(value) > MAX_CHOICES:
            raise ValueError(f"a request takes at most {MAX_CHOICES} prompts, got {len(value)}")
        if all(isinstance(x, str) or (isinstance(x, list) and _token_ids(x)) for x in value):
            return value
    raise ValueError("prompt must be a string, a list of strings, a list of token ids or a list of "
                     "token-id lists")


Prompt = Annotated[Any, PlainValidator(_check_prompt, json_schema_input_type=(
    str | list[str] | list[int] | list[list[int]]))]


class CompletionRequest(_Common):
    prompt: Prompt
    max_tokens: int | None = Field(16, ge=0)        # 0: only with echo (score the prompt, generate nothing)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: None = None
    best_of: int | None = Field(None, ge=1, le=1)

    def prompt_logprob_k(self) -> int | None:
        """echo with logprobs scores the prompt too (its tokens' logprobs lead the choice's)."""
        if self.echo and self.logprobs is not None:
            return max(self.logprobs, self.prompt_logprobs or 0)
        return self.prompt_logprobs

    @model_validator(mode="after")
    def _zero_tokens_with_echo(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise FieldError("max_tokens", "0 is allowed only with echo: true")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


def _check_content(value: Any) -> str | None:
    """A message's content: a string, a list of text parts (joined here), or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                       isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise ValueError("content must be a string, null, or a list of {\"type\": \"text\", \"text\": ...} parts "
                     "(only text is supported)")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[Any, PlainValidator(_check_content, json_schema_input_type=(
        str | list[ContentPart] | None))] = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = Field(None, max_length=128)   # an assistant's earlier calls
    tool_call_id: str | None = None                                        # a tool message's answer to one

    def text(self) -> str:
        return self.content or ""

    def template_message(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls is not None:
            msg["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        return msg


class ChatCompletionRequest(_Common, ToolFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_logprobs_with_logprobs(self) -> ChatCompletionRequest:
        # OpenAI and vLLM refuse it too: without logprobs the alternatives would be dropped unsaid
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs", "top_logprobs needs logprobs: true")
        return self

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.template_message() for m in self.messages]
