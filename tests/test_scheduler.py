"""The scheduler on its own: no model, no torch tensors. A step is simulated as the engine runs it
(`step`): chunks computed, a token appended to each sequence the batch samples."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from loramux.engine.block_manager import BlockManager
from loramux.engine.sampling_params import SamplingParams
from loramux.engine.scheduler import ScheduledBatch, Scheduler
from loramux.engine.sequence import Sequence


@dataclass
class FakeLease:
    adapter_id: str
    slot: int
    version: int = 1
    prefix_kv: object = None


class SlotPool:
    """A stand-in registry with `n` slots whose adapters in `loading` are not ready until `finish_loading`."""

    def __init__(self, n: int) -> None:
        self.free = list(range(n))
        self.held: dict[str, tuple[int, int]] = {}        # adapter -> (slot, refcount)
        self.loading: set[str] = set()
        self.prefetched: list[str] = []
        self.acquires = 0

    def prefetch(self, adapter_id: str) -> None:
        self.prefetched.append(adapter_id)

    def is_loading(self, adapter_id: str) -> bool:
        return adapter_id in self.loading

    def try_acquire(self, adapter_id: str):
        if adapter_id in self.loading:
            return None
        self.acquires += 1
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


def seq(name: str, n_prompt: int = 5, adapter: str | None = None, max_tokens: int = 4) -> Sequence:
    """A request whose prompt is its own (no prefix shared with another name's)."""
    first = 1000 * (1 + sum(map(ord, name)))
    return Sequence(name, list(range(first, first + n_prompt)), SamplingParams(max_tokens=max_tokens),
                    adapter_id=adapter)


def step(sched: Scheduler) -> ScheduledBatch:
    """Schedule, then do what the runner and the engine do to the sequences (token 7 sampled)."""
    batch = sched.schedule()
    assert batch.num_tokens <= (sched.max_num_batched_tokens if batch.decodes else sched.max_prefill_tokens)
    sampled = batch.sampled
    for s, end in zip(batch.prefills, batch.chunk_ends):
        s.num_computed_tokens = end
    for s in batch.decodes:
        s.num_computed_tokens = s.num_tokens
    for s in sampled:
        s.output_token_ids.append(7)
        if len(s.output_token_ids) >= s.params.max_tokens:
            sched.finish(s, "length")
    return batch


def test_new_requests_join_running_batch_and_finished_leave():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=64)
    a = seq("a")
    sched.add(a)
    assert step(sched).prefills == [a]
    b = seq("b")
    sched.add(b)
    batch = step(sched)
    assert batch.decodes == [a] and batch.prefills == [b]
    sched.finish(a, "stop")
    assert sched.running == [b]


def test_long_prompt_is_chunked_behind_the_decodes():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    streams = [seq(f"s{i}", 2, max_tokens=50) for i in range(3)]
    for s in streams:
        sched.add(s)
    step(sched)                                      # 3 short prompts, 6 tokens
    long = seq("long", 20)
    sched.add(long)
    ends = []
    while not long.output_token_ids:
        batch = step(sched)
        assert batch.decodes == streams              # every stream decodes in every step, first
        ends.append(batch.chunk_ends[0])
        assert bool(long.output_token_ids) == (ends[-1] == 20)   # a token only from the last chunk
    assert ends == [7, 14, 20]                       # 10 - 3 decodes per step
    assert long.is_decoding


def test_arrivals_are_admitted_beside_prefills_in_progress_with_half_a_budget():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=8)
    first, second, third = seq("first", 12), seq("second", 13), seq("third", 3)
    for s in (first, second, third):
        sched.add(s)
    batch = step(sched)
    assert batch.prefills == [first] and batch.chunk_ends == [8]
    batch = step(sched)                              # second starts (4 of 8 tokens), first finishes its prompt
    assert batch.prefills == [second, first] and batch.chunk_ends == [4, 12]
    batch = step(sched)                              # first decodes; third starts whole, second gets the rest
    assert batch.decodes == [first] and batch.prefills == [third, second] and batch.chunk_ends == [3, 8]
    batch = step(sched)
    assert batch.decodes == [first, third] and batch.prefills == [second] and batch.chunk_ends == [13]


def test_whole_prompts_while_nothing_decodes_chunks_while_streams_run():
    sched = Scheduler(BlockManager(256, 4), max_num_seqs=8, max_num_batched_tokens=10, max_prefill_tokens=64)
    first = seq("first", 40, max_tokens=20)
    sched.add(first)
    batch = step(sched)                              # idle: the whole prompt in one step, first token at once
    assert batch.prefills == [first] and batch.chunk_ends == [40] and first.output_token_ids
    second = seq("second", 40)
    sched.add(second)
    ends = []
    while not second.output_token_ids:
        batch = step(sched)
        assert batch.decodes == [first]
        ends.append(batch.chunk_ends[0])
    assert ends == [9, 18, 27, 36, 40]               # 10 - 1 decode per step


def test_idle_prefill_is_bounded_by_max_prefill_tokens():
    sched = Scheduler(BlockManager(256, 4), max_num_seqs=8, max_num_batched_tokens=10, max_prefill_tokens=64)
    a, b = seq("a", 100), seq("b", 20)
    sched.add(a)
    sched.add(b)
    assert step(sched).chunk_ends == [64]
    batch = step(sched)                              # b arrives beside a's prefill: a short step (10 tokens)
    assert batch.prefills == [b, a] and batch.chunk_ends == [5, 69]
    batch = step(sched)                              # b is under way too: nobody waits, nobody decodes
    assert batch.prefills == [a, b] and batch.chunk_ends == [100, 20]


def test_a_short_request_gets_its_token_in_the_next_step_while_a_long_prompt_prefills():
    """Head-of-line: the long prompt takes every idle step until a request arrives; that request is
    admitted at once, its whole prompt in a streaming-budget step, so its first token comes after
    one short step (not after the long prompt's remaining prefill)."""
    sched = Scheduler(BlockManager(256, 4), max_num_seqs=8, max_num_batched_tokens=16, max_prefill_tokens=64)
    long = seq("long", 600)
    sched.add(long)
    assert step(sched).chunk_ends == [64]
    short = seq("short", 4)
    sched.add(short)
    batch = step(sched)
    assert batch.prefills == [short, long] and batch.chunk_ends == [4, 76]   # 16 tokens
    assert short.output_token_ids
    progress = long.num_computed_tokens
    for i in range(20):                              # a new short request every step: the long prompt goes on
        sched.add(seq(f"s{i}", 4, max_tokens=2))
        step(sched)
        assert long.num_computed_tokens > progress
        progress = long.num_computed_tokens


def test_a_request_that_cannot_start_does_not_shrink_an_idle_prefill():
    pool = SlotPool(4)
    pool.loading.add("cold")
    sched = Scheduler(BlockManager(256, 4), max_num_seqs=8, max_num_batched_tokens=16, max_prefill_tokens=64,
                      adapters=pool)
    long, cold = seq("long", 300), seq("cold", 4, adapter="cold")
    sched.add(long)
    assert step(sched).chunk_ends == [64]
    sched.add(cold)
    assert step(sched).chunk_ends == [128]           # cold's adapter is loading: the long prompt keeps the step
    assert cold.waits == 0                           # loading: no step counts toward its patience
    pool.loading.clear()
    batch = step(sched)
    assert batch.prefills == [cold, long] and batch.chunk_ends == [4, 140]


def test_budget_must_hold_one_decode_per_sequence():
    with pytest.raises(ValueError, match="max_num_seqs"):
        Scheduler(BlockManager(64, 4), max_num_seqs=16, max_num_batched_tokens=8)


def test_requests_wait_for_an_adapter_slot_without_blocking_others():
    pool = SlotPool(1)
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=64, adapters=pool)
    x1, y, base, x2 = seq("x1", adapter="x"), seq("y", adapter="y"), seq("base"), seq("x2", adapter="x")
    for s in (x1, y, base, x2):
        sched.add(s)
    assert pool.prefetched == ["x", "y", "x"]        # loading starts when a request arrives
    batch = step(sched)
    assert batch.prefills == [x1, base, x2]          # y waits for the only slot; nothing is evicted
    assert list(sched.waiting) == [y]
    sched.finish(x1, "stop")
    assert step(sched).prefills == []                # x2 still holds the slot
    sched.finish(x2, "stop")
    assert step(sched).prefills == [y]
    sched.finish(y, "stop")
    sched.finish(base, "stop")
    assert pool.held == {} and sched.blocks.num_free == 64


def test_a_loading_adapter_holds_up_nothing_and_its_lease_spans_every_chunk():
    pool = SlotPool(4)
    pool.loading.add("cold")
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=8, adapters=pool)
    cold, warm, base = seq("cold", 12, adapter="cold"), seq("warm", 3, adapter="warm"), seq("base", 3)
    for s in (cold, warm, base):
        sched.add(s)
    assert step(sched).prefills == [warm, base]
    assert step(sched).prefills == []                # still loading: nothing to admit
    pool.loading.clear()
    acquires = pool.acquires
    ends = [step(sched).chunk_ends for _ in range(2)]
    assert ends == [[6], [12]]                       # 8 - 2 decodes, then the rest
    assert pool.acquires == acquires + 1 and cold.lease.adapter_id == "cold"   # leased once, across chunks


def test_a_starved_request_gets_a_slot_once_patience_runs_out():
    """Two slots kept busy by a stream of requests for two resident adapters: the request for a third
    adapter is skipped at first, then requests behind it that name an adapter wait until it runs."""
    pool = SlotPool(2)
    sched = Scheduler(BlockManager(256, 4), max_num_seqs=8, max_num_batched_tokens=64, adapters=pool, patience=3)
    sched.add(seq("a0", adapter="a", max_tokens=3))
    sched.add(seq("b0", adapter="b", max_tokens=3))
    step(sched)
    starved = seq("c", adapter="c", max_tokens=2)
    sched.add(starved)
    for i in range(1, 40):
        for name in ("a", "b"):                      # a new request for each busy adapter every step
            sched.add(seq(f"{name}{i}", adapter=name, max_tokens=3))
        sched.add(seq(f"base{i}", max_tokens=1))
        batch = step(sched)
        if starved in batch.prefills:
            break
        assert any(s.adapter_id is None for s in batch.prefills)   # base-model requests never wait
    else:
        pytest.fail("the request for adapter c never ran")
    assert starved.waits > 3


def test_preemption_frees_blocks_and_requeues_newest():
    blocks = BlockManager(5, 4, enable_prefix_caching=False)   # 20 token slots in all
    sched = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = seq("a", 8), seq("b", 8)
    sched.add(a)
    sched.add(b)
    assert step(sched).prefills == [a, b]            # 2 blocks each, 1 left
    batch = sched.schedule()                         # token 9 needs a third block each: a takes the last, b goes
    assert batch.decodes == [a] and list(sched.waiting) == [b]
    assert b.block_table == [] and b.num_computed_tokens == 0 and blocks.num_free == 2


def test_a_load_that_never_ends_makes_no_barrier():
    """A request whose adapter is still loading after many steps does not hold back requests behind it
    (only waiting for a slot counts toward patience): their adapters are resident."""
    pool = SlotPool(4)
    pool.loading.add("stuck")
    sched = Scheduler(BlockManager(256, 4), max_num_seqs=8, max_num_batched_tokens=64, adapters=pool, patience=3)
    stuck = seq("stuck", adapter="stuck")
    sched.add(stuck)
    for i in range(12):
        behind = seq(f"w{i}", adapter="warm", max_tokens=1)
        sched.add(behind)
        assert behind in step(sched).prefills
    assert stuck.waits == 0 and list(sched.waiting) == [stuck]
