"""A sequence: one prompt and the tokens generated for it, plus where its KV lives."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

import torch

from loramux.engine.sampling_params import SamplingParams

_seq_ids = itertools.count()


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float | None               # None: an echoed prompt's first token (nothing predicts it)
    top: list[tuple[int, float]]        # (token id, logprob), most likely first
    rank: int | None = None             # 1 + how many tokens were more likely (prompt logprobs)


@dataclass
class Sequence:
    """Logical layout: [virtual prefix tokens | prompt tokens | output tokens].

    Virtual tokens (from a prefix-tuning adapter) have KV but no token ids; positions count them,
    as peft does when it passes the prefix as past_key_values.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter_id: str | None = None
    index: int = 0                      # which of the request's n choices this sequence is
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0        # logical tokens whose KV is in the cache
    num_prefix_tokens: int = 0          # virtual tokens (set when the adapter lease is taken)
    lease: Any = None                   # adapter registry lease, held while the sequence runs
    cache_seed: bytes | None = None     # first link of its KV blocks' hash chain (adapter id + weights version)
    block_hashes: list[bytes] = field(default_factory=list)   # chain hashes of its first full blocks
    num_hashed_blocks: int = 0          # leading blocks of block_table registered in the prefix cache
    waits: int = 0                      # scheduling passes skipped while its adapter was not ready
    num_preemptions: int = 0
    generator: torch.Generator | None = None
    matcher: Any = None                 # structured output: this sequence's grammar state (llguidance)
    prompt_token_set: torch.Tensor | None = None  # distinct prompt ids (repetition_penalty), made once
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # prompt tokens 1.. scored so far
    finish_reason: str | None = None
    error: str | None = None            # why the sequence failed (finish_reason "error")
    error_status: int = 500
    text: str = ""                      # detokenized output, cut at a stop string
    sent_chars: int = 0                 # how much of `text` was already handed to the client
    prefix_offset: int = 0              # detokenizer window: output ids decoded as context only
    read_offset: int = 0                # output ids whose text is already in `text`
    arrival_time: float = 0.0
    first_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def lora_slot(self) -> int:
        return getattr(self.lease, "slot", -1) if self.lease is not None else -1

    def token_at(self, logical_index: int) -> int:
        i = logical_index - self.num_prefix_tokens
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < n else self.output_token_ids[i - n]

    def hash_token(self, logical_index: int) -> int:
        """The token at a logical position as the prefix cache hashes it: virtual tokens (no ids)
        are -1, -2, ... (which adapter's they are is in the chain's seed)."""
        if logical_index < self.num_prefix_tokens:
            return -1 - logical_index
        return self.token_at(logical_index)

    @property
    def compute_start(self) -> int:
        """First logical position a step would compute: virtual tokens are copied, never computed."""
        return max(self.num_computed_tokens, self.num_prefix_tokens)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens still to run through the model (what a step's token budget counts)."""
        return self.num_tokens - self.compute_start

    @property
    def is_decoding(self) -> bool:
        """Running with only its last token to compute: one decode row per step."""
        return self.num_computed_tokens >= self.num_prefix_tokens and self.num_tokens - self.num_computed_tokens == 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
