"""Scheduler and block manager on their own: no model, no torch tensors."""
from __future__ import annotations

from dataclasses import dataclass

from loramux.engine.block_manager import BlockManager
from loramux.engine.sampling_params import SamplingParams
from loramux.engine.scheduler import Scheduler
from loramux.engine.sequence import Sequence


@dataclass
class FakeLease:
    adapter_id: str
    slot: int
    prefix_kv: object = None


class SlotPool:
    """A stand-in registry with `n` slots: the scheduler only needs try_acquire/release."""

    def __init__(self, n: int) -> None:
        self.free = list(range(n))
        self.held: dict[str, tuple[int, int]] = {}        # adapter -> (slot, refcount)

    def try_acquire(self, adapter_id: str):
        if adapter_id in self.held:
            slot, n = self.held[adapter_id]
            self.held[adapter_id] = (slot, n + 1)
            return FakeLease(adapter_id, slot)
        if not self.free:
            return None
        slot = self.free.pop()
        self.held[adapter_id] = (slot, 1)
        return FakeLease(adapter_id, slot)

    def release(self, lease) -> None:
        slot, n = self.held[lease.adapter_id]
        if n == 1:
            del self.held[lease.adapter_id]
            self.free.append(slot)
        else:
            self.held[lease.adapter_id] = (slot, n - 1)


def seq(name: str, n_prompt: int = 5, adapter: str | None = None) -> Sequence:
    return Sequence(name, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=4), adapter_id=adapter)


def test_new_requests_join_running_batch_and_finished_leave():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=64)
    a = seq("a")
    sched.add(a)
    assert sched.schedule().prefills == [a]
    a.num_computed_tokens = a.num_tokens
    a.output_token_ids.append(7)
    b = seq("b")
    sched.add(b)
    batch = sched.schedule()
    assert batch.decodes == [a] and batch.prefills == [b]
    sched.finish(a, "stop")
    assert sched.running == [b]


def test_token_budget_keeps_fifo_order():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=12)
    first, big, small = seq("first", 5), seq("big", 10), seq("small", 2)
    for s in (first, big, small):
        sched.add(s)
    assert sched.schedule().prefills == [first]      # `big` does not fit; `small` may not jump it
    assert list(sched.waiting) == [big, small]


def test_requests_wait_for_an_adapter_slot_without_blocking_others():
    pool = SlotPool(1)
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=64, adapters=pool)
    x1, y, base, x2 = seq("x1", adapter="x"), seq("y", adapter="y"), seq("base"), seq("x2", adapter="x")
    for s in (x1, y, base, x2):
        sched.add(s)
    batch = sched.schedule()
    assert batch.prefills == [x1, base, x2]          # y waits for the only slot; nothing is evicted
    assert list(sched.waiting) == [y]
    sched.finish(x1, "stop")
    assert sched.schedule().prefills == []           # x2 still holds the slot
    sched.finish(x2, "stop")
    assert sched.schedule().prefills == [y]
    sched.finish(y, "stop")
    sched.finish(base, "stop")
    assert pool.held == {} and sched.blocks.num_free == 64


def test_preemption_frees_blocks_and_requeues_newest():
    blocks = BlockManager(5, 4)                      # 20 token slots in all
    sched = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = seq("a", 8), seq("b", 8)
    sched.add(a)
    sched.add(b)
    assert sched.schedule().prefills == [a, b]       # 2 blocks each, 1 left
    for s in (a, b):
        s.num_computed_tokens = s.num_tokens
        s.output_token_ids.append(1)                 # token 9 needs a third block each
    batch = sched.schedule()                         # a takes the last block; b is preempted
    assert batch.decodes == [a] and list(sched.waiting) == [b]
    assert b.block_table == [] and b.num_computed_tokens == 0 and blocks.num_free == 2


def test_prefix_blocks_are_shared_and_freed_with_the_last_user():
    blocks = BlockManager(16, 4)
    kv = object()
    seqs = []
    for name in ("p1", "p2"):
        s = seq(name, 3)
        s.num_prefix_tokens, s.prefix_key = 9, ("pfx", id(kv))   # 2 full shared blocks + 1 row private
        assert blocks.can_allocate(s)
        blocks.allocate(s)
        seqs.append(s)
    p1, p2 = seqs
    assert p1.block_table[:2] == p2.block_table[:2]
    assert p1.prefix_rows_written == 0 and p2.prefix_rows_written == 8
    assert p1.block_table[2] != p2.block_table[2]
    assert blocks.num_used == 2 + 2 * 1              # 12 logical tokens = 3 blocks each, 2 shared
    blocks.free(p1)
    assert blocks.num_used == 3 and ("pfx", id(kv)) in blocks.shared
    blocks.free(p2)
    assert blocks.num_used == 0 and blocks.shared == {}
