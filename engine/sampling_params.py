"""Per-request sampling parameters (OpenAI and vLLM semantics), validated where they are made."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loramux.engine.structured import Grammar

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 300                    # entries of `logit_bias` (OpenAI's own bound)


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                      # 0 = off
    min_p: float = 0.0                  # 0 = off; else keep tokens with prob >= min_p * the top prob
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0                 # EOS and stop_token_ids masked, stop strings ignored until then
    presence_penalty: float = 0.0       # OpenAI: subtracted once from every token already generated
    frequency_penalty: float = 0.0      # OpenAI: subtracted per occurrence in the generated tokens
    repetition_penalty: float = 1.0     # transformers/vLLM: prompt and generated tokens' logits / p (or * p below 0)
    logit_bias: dict[int, float] = field(default_factory=dict)   # token id -> added to its logit
    logprobs: int | None = None         # None = off; k = also return the k most likely alternatives
    prompt_logprobs: int | None = None  # None = off; k = each prompt token's logprob and the top k
    grammar: Grammar | None = None      # structured output: a compiled grammar (engine/structured.py)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError("temperature must be between 0 and 2")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be 0 (off) or positive")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError("min_p must be in [0, 1]")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be between 0 and {MAX_LOGPROBS}")
        if len(self.stop) > 4 or any(not s for s in self.stop):
            raise ValueError("stop takes at most 4 non-empty strings")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            # torch generators take 64-bit seeds; a bigger one would fail inside the engine thread.
            raise ValueError("seed must be a 64-bit signed integer")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError("min_tokens must be between 0 and max_tokens")
        if not (-2.0 <= self.presence_penalty <= 2.0 and -2.0 <= self.frequency_penalty <= 2.0):
            raise ValueError("presence_penalty and frequency_penalty must be between -2 and 2")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError("repetition_penalty must be in (0, 2]")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias takes at most {MAX_LOGIT_BIAS} tokens")
        if any(not -100.0 <= b <= 100.0 for b in self.logit_bias.values()):
            raise ValueError("logit_bias values must be between -100 and 100")
        for name, ids in (("logit_bias", self.logit_bias), ("stop_token_ids", self.stop_token_ids)):
            if any(t < 0 for t in ids):
                raise ValueError(f"{name} takes token ids, which are not negative")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def shapes_logits(self) -> bool:
        """Whether anything but temperature/top-k/top-p/min-p changes the logits (the sampler's slow path)."""
        return self.has_penalties or bool(self.logit_bias) or self.min_tokens > 0 or self.grammar is not None
