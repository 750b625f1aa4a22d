"""Continuous batching: which sequences run in the next step.

Every step carries all running sequences' decode tokens plus as many waiting prompts as fit the
token, sequence, KV-block and adapter-slot budgets, in arrival order. New requests join a running
batch between steps; finished ones leave. A request whose adapter cannot get a device slot (all
held by running requests) waits instead of evicting one in use.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from loramux.engine.block_manager import BlockManager
from loramux.engine.sequence import Sequence, SequenceStatus


class AdapterLeaser(Protocol):
    def try_acquire(self, adapter_id: str) -> Any | None: ...
    def release(self, lease: Any) -> None: ...


@dataclass
class ScheduledBatch:
    prefills: list[Sequence] = field(default_factory=list)   # compute all their uncomputed tokens
    decodes: list[Sequence] = field(default_factory=list)    # compute their last token

    @property
    def sequences(self) -> list[Sequence]:
        return self.prefills + self.decodes

    def __bool__(self) -> bool:
        return bool(self.prefills or self.decodes)


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 adapters: AdapterLeaser | None = None) -> None:
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.adapters = adapters
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.failed: list[Sequence] = []          # could not start (adapter gone); reported by the engine

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        self._schedule_decodes(batch)
        self._admit_waiting(batch)
        return batch

    def _schedule_decodes(self, batch: ScheduledBatch) -> None:
        running = list(self.running)
        while running:
            seq = running.pop(0)
            while not self.blocks.can_append(seq):
                # Out of KV blocks: preempt the newest sequence (recomputed later) to let older ones finish.
                victim = running.pop() if running else seq
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.append_slot(seq)
                batch.decodes.append(seq)

    def _admit_waiting(self, batch: ScheduledBatch) -> None:
        budget = self.max_num_batched_tokens - len(batch.decodes)
        skipped: list[Sequence] = []
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            need = seq.num_real_tokens
            if need > budget:
                break
            if seq.adapter_id is not None and seq.lease is None:
                try:
                    seq.lease = self.adapters.try_acquire(seq.adapter_id)
                except Exception as exc:  # noqa: BLE001 - unloaded or unreadable adapter: fail this request only
                    self.waiting.popleft()
                    self.finish(seq, "error")
                    seq.error = getattr(exc, "message", None) or str(exc)
                    seq.error_status = getattr(exc, "status", 500)
                    self.failed.append(seq)
                    continue
                if seq.lease is None:
                    # No free adapter slot: this request waits, others behind it may still run.
                    skipped.append(self.waiting.popleft())
                    continue
                seq.num_prefix_tokens = _prefix_len(seq.lease)
                if seq.num_prefix_tokens:
                    seq.prefix_key = (seq.adapter_id, id(seq.lease.prefix_kv))
            if not self.blocks.can_allocate(seq):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.prefills.append(seq)
            budget -= need
        self.waiting.extendleft(reversed(skipped))

    def preempt(self, seq: Sequence) -> None:
        """Give back a running sequence's blocks; it re-enters the queue front to be recomputed."""
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.WAITING
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
