"""Continuous batching with chunked prefill: which tokens of which sequences run in the next step.

A step has one of two token budgets:
- `max_num_batched_tokens` while any sequence decodes: the step is then a token of every stream,
  and its length is their inter-token latency, so prompts go in chunks of what the decodes leave;
- `max_prefill_tokens` while none does: nobody waits for a token, so whole prompts are prefilled
  (chunking costs a long prompt about a step's fixed cost per chunk); the bound keeps one step's
  activations (and a prompt_logprobs request's logit rows) in check.
It is spent in this order:
1. every running sequence's decode token (out of KV blocks: the newest sequence is preempted and
   recomputed later);
2. while prefills are in progress, waiting requests first, with half a streaming budget between
   them, so a short request never waits for a long prompt's whole prefill (head-of-line blocking).
   A step that admits one beside a prefill in progress is a streaming-budget step: the new request's
   first token comes after one short step, not after a long prompt's chunk;
3. prefills in progress, in arrival order: the next chunk of each, as much as the budget allows;
4. waiting requests, in arrival order, while the sequence and KV-block budgets allow: each is
   admitted with KV blocks for its whole prompt (its cached prefix reused) and computes a first
   chunk.
So a long prompt never stalls the running streams for longer than one budget's worth of tokens, nor
the requests arriving behind it; only a sequence whose prefill completes in a step gets a sampled token.

Adapters: a request's adapter is leased at admission and held until it finishes (across chunks).
A request whose adapter is not ready (its weights still loading in the background, or no slot
free for it) is skipped: requests behind it, for the base model or for adapters that are ready,
go ahead. So that skipping cannot starve it, a request skipped for `patience` steps for want of a
slot becomes a barrier: no request behind it that names an adapter is admitted until it runs, so
running requests drain and free a slot for it (base-model requests still go ahead: they need no
slot). Steps spent loading its weights do not count: a load stuck on a slow disk holds up nobody.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from loramux.engine.block_manager import BlockManager
from loramux.engine.prefix_cache import chain_seed
from loramux.engine.sequence import Sequence, SequenceStatus

# Passes a request may be skipped for its adapter before requests behind it wait for it. At tens
# of milliseconds a step that is around a second: far longer than a load (tens to hundreds of ms).
ADAPTER_PATIENCE = 16


class AdapterLeaser(Protocol):
    def prefetch(self, adapter_id: str) -> None:
        """Start making `adapter_id` ready in the background (a request for it arrived)."""

    def try_acquire(self, adapter_id: str) -> Any | None:
        """A lease (with `.slot`, `.version`, `.prefix_kv`), or None while it is not ready."""

    def is_loading(self, adapter_id: str) -> bool:
        """Whether `adapter_id`'s weights are on their way (read from disk or written into a slot)."""

    def release(self, lease: Any) -> None: ...


@dataclass
class ScheduledBatch:
    prefills: list[Sequence] = field(default_factory=list)   # compute a chunk of their tokens
    chunk_ends: list[int] = field(default_factory=list)      # each prefill's chunk ends before this position
    decodes: list[Sequence] = field(default_factory=list)    # compute their last token

    def add_prefill(self, seq: Sequence, num_tokens: int) -> None:
        self.prefills.append(seq)
        self.chunk_ends.append(seq.compute_start + num_tokens)

    @property
    def sequences(self) -> list[Sequence]:
        return self.prefills + self.decodes

    @property
    def sampled(self) -> list[Sequence]:
        """Sequences that get a token from this step, in the model runner's logit-row order: the
        prefills whose last chunk this is, then the decodes. (Read before the tokens are appended.)"""
        return [s for s, end in zip(self.prefills, self.chunk_ends) if end == s.num_tokens] + self.decodes

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(end - s.compute_start for s, end in zip(self.prefills, self.chunk_ends))

    def __bool__(self) -> bool:
        return bool(self.prefills or self.decodes)


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_prefill_tokens: int | None = None, adapters: AdapterLeaser | None = None,
                 patience: int = ADAPTER_PATIENCE) -> None:
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError("max_num_batched_tokens must be at least max_num_seqs (one decode token each)")
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # None: one budget for every step (EngineConfig.max_prefill_tokens is the engine's default).
        self.max_prefill_tokens = max(max_prefill_tokens or 0, max_num_batched_tokens)
        self.adapters = adapters
        self.patience = patience
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.failed: list[Sequence] = []          # could not start (adapter gone); reported by the engine

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        if seq.adapter_id is not None and self.adapters is not None:
            self.adapters.prefetch(seq.adapter_id)

    def schedule(self, arrivals_only: bool = False) -> ScheduledBatch:
        """The next step. `arrivals_only` (the step after one that stopped for arrivals,
        engine.llm_engine): a step that admits waiting requests beside a prefill in progress carries
        no chunk of that prefill, so the arrivals' first tokens come after a step of their own size."""
        batch = ScheduledBatch()
        self.blocks.begin_step()
        self._schedule_decodes(batch)
        in_progress = [s for s in self.running if not s.is_decoding]
        streaming = bool(batch.decodes)
        budget = (self.max_num_batched_tokens if streaming else self.max_prefill_tokens) - len(batch.decodes)
        skipped: set[int] = set()               # seq ids whose wait this step already counted
        if in_progress and self.waiting:
            # Head-of-line: arrivals first, with half a streaming budget, before the prefills under way.
            share = min(budget, max(1, self.max_num_batched_tokens // 2))
            admitted = len(self.running)
            used = share - self._admit_waiting(batch, share, skipped)
            if len(self.running) > admitted:    # someone is starting: keep this step short
                budget = used if arrivals_only else min(budget, self.max_num_batched_tokens - len(batch.decodes))
            budget -= used
        budget = self._continue_prefills(batch, budget, in_progress)
        self._admit_waiting(batch, budget, skipped)
        return batch

    def _add_prefill(self, batch: ScheduledBatch, seq: Sequence, num_tokens: int) -> None:
        """Schedule a chunk. The full blocks it completes are registered in the prefix cache at once,
        so a request admitted after it in this very step can share them: within each layer every new
        token's K/V is written before any sequence attends."""
        batch.add_prefill(seq, num_tokens)
        self.blocks.cache_full_blocks(seq, batch.chunk_ends[-1])

    def _schedule_decodes(self, batch: ScheduledBatch) -> None:
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            if not seq.is_decoding:
                i += 1
                continue
            while not self.blocks.can_append(seq):
                # Out of KV blocks: preempt the newest sequence (recomputed later) to let older ones finish.
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.append_slot(seq)
                self.blocks.cache_full_blocks(seq, seq.num_tokens)
                batch.decodes.append(seq)
                i += 1

    def _continue_prefills(self, batch: ScheduledBatch, budget: int, in_progress: list[Sequence]) -> int:
        for seq in in_progress:
            if budget <= 0:
                break
            if seq.status is SequenceStatus.RUNNING:     # not preempted by this step's decodes
                n = min(seq.num_uncomputed_tokens, budget)
                self._add_prefill(batch, seq, n)
                budget -= n
        return budget

    def _admit_waiting(self, batch: ScheduledBatch, budget: int, counted: set[int]) -> int:
        """Admit waiting requests within `budget` tokens; returns what is left of it. A request's
        skip is counted once a step (`counted`: the seq ids already counted)."""
        skipped: list[Sequence] = []
        barrier = False                          # a starved request waits ahead: adapter requests hold back
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.adapter_id is not None and seq.lease is None and (barrier or not self._lease(seq)):
                if seq.status is not SequenceStatus.FINISHED:       # not ready: skipped this pass
                    if seq.seq_id not in counted and not self.adapters.is_loading(seq.adapter_id):
                        counted.add(seq.seq_id)
                        seq.waits += 1
                    barrier = barrier or seq.waits > self.patience
                    skipped.append(self.waiting.popleft())
                continue
            if seq.cache_seed is None:
                seq.cache_seed = chain_seed(seq.adapter_id, getattr(seq.lease, "version", 0))
            if not self.blocks.can_allocate(seq):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq, count_stats=not seq.num_preemptions)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            self._add_prefill(batch, seq, n)
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        return budget

    def _lease(self, seq: Sequence) -> bool:
        """Take `seq`'s adapter lease: True when held; False when not ready yet, or when the request
        failed (the adapter was removed or cannot be read: the request is retired, the rest go on)."""
        try:
            seq.lease = self.adapters.try_acquire(seq.adapter_id)
        except Exception as exc:  # noqa: BLE001 - unloaded or unreadable adapter: fail this request only
            self.waiting.popleft()
            self.finish(seq, "error")
            seq.error = getattr(exc, "message", None) or str(exc)
            seq.error_status = getattr(exc, "status", 500)
            self.failed.append(seq)
            return False
        if seq.lease is None:
            return False
        seq.num_prefix_tokens = _prefix_len(seq.lease)
        return True

    def preempt(self, seq: Sequence) -> None:
        """Give back a running sequence's blocks; it re-enters the queue front to be recomputed
        (from its cached blocks, when prefix caching kept them)."""
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire a sequence: free its KV blocks and its adapter reference."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        if seq.lease is not None and self.adapters is not None:
            self.adapters.release(seq.lease)
        seq.lease = None
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def find(self, request_id: str) -> list[Sequence]:
        return [s for s in (*self.running, *self.waiting) if s.request_id == request_id]


def _prefix_len(lease: Any) -> int:
    kv = getattr(lease, "prefix_kv", None)
    return 0 if kv is None else int(kv.shape[2])
