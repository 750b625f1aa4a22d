"""OpenAI request bodies (pydantic, at the HTTP edge only) and their mapping to SamplingParams.

Strict types (a boolean is not an integer, "yes" is not a boolean), and bounded work: parsed with
`model_validate_json` (server/json_body.py), whose JSON parser stops at 200 levels of nesting.
The fields a client can make long (`prompt`, message `content`) are checked by plain Python
functions rather than pydantic unions: a union over a million-element list runs as one native
call that holds the GIL for about a second, while Python code lets the event loop take turns
when the body is parsed in a worker thread.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, field_validator

from loramux.adapters_registry.mixtures import MAX_SOURCES
from loramux.engine.sampling_params import MAX_LOGPROBS, SamplingParams

MAX_N = 16
MAX_CHOICES = 128                     # prompts x n in one request: bounds what one request adds to the queue
MAX_MESSAGES = 2048                   # OpenAI's own bound on `messages`
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


class _Common(MixtureFields):                   # `adapters` set: a per-request mixture on the base model
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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, v: float) -> float:
        if v != 0.0:
            raise ValueError("presence and frequency penalties are not supported; send 0")
        return v

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, seed=self.seed, stop=list(self.stop or []),
                              ignore_eos=self.ignore_eos, logprobs=logprobs)


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
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: Literal[False] = False
    suffix: None = None
    best_of: int | None = Field(None, ge=1, le=1)

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

    def text(self) -> str:
        return self.content or ""


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: None = None

    def template_messages(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]
