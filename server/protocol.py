"""OpenAI request bodies (pydantic, at the HTTP edge only) and their mapping to SamplingParams."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from loramux.engine.sampling_params import MAX_LOGPROBS, SamplingParams

MAX_N = 16


class StreamOptions(BaseModel):
    include_usage: bool = False


class AdapterWeight(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    weight: float = 1.0


class MixtureFields(BaseModel):
    """A mixture of registered LoRA adapters, merged as peft's add_weighted_adapter would
    (adapters_registry/merge.py): `merge` is linear | task_arithmetic | ties | dare_linear | dare_ties
    (or another peft combination type); `density` is the fraction ties / dare keep; DARE's random
    drop is seeded by `merge_seed` (in a completion request: else its `seed`, else 0)."""
    adapters: list[AdapterWeight] | None = None
    merge: str = "linear"
    density: float | None = None
    merge_seed: int | None = None
    majority_sign_method: Literal["total", "frequency"] = "total"

    def recipe_args(self, fallback_seed: int | None = None) -> dict:
        """Keyword arguments of adapters_registry.mixtures.MixtureRecipe.create."""
        return {"adapters": [(a.id, a.weight) for a in self.adapters or []], "method": self.merge,
                "density": self.density, "majority_sign_method": self.majority_sign_method,
                "seed": self.merge_seed if self.merge_seed is not None else fallback_seed}


class _Common(MixtureFields):                   # `adapters` set: a per-request mixture on the base model
    model_config = ConfigDict(extra="allow")      # unknown OpenAI fields are tolerated, as OpenAI does

    model: str
    adapter_id: str | None = None                # LoRAX-style: names the adapter in the body
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)   # torch generators take 64-bit seeds
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

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


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: Literal[False] = False
    suffix: None = None
    best_of: int | None = Field(None, ge=1, le=1)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        return v

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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: None = None

    def template_messages(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]
