"""Per-request sampling parameters (OpenAI semantics), validated where they are made."""
from __future__ import annotations

from dataclasses import dataclass, field

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                      # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None         # None = off; k = also return the k most likely alternatives

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError("temperature must be between 0 and 2")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be 0 (off) or positive")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_LOGPROBS}")
        if len(self.stop) > 4 or any(not s for s in self.stop):
            raise ValueError("stop takes at most 4 non-empty strings")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            # torch generators take 64-bit seeds; a bigger one would fail inside the engine thread.
            raise ValueError("seed must be a 64-bit signed integer")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1
