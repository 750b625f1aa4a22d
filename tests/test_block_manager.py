"""The block manager and its prefix cache on their own: no model, no torch tensors."""
from __future__ import annotations

from loramux.engine.block_manager import BlockManager
from loramux.engine.prefix_cache import chain_seed
from loramux.engine.sampling_params import SamplingParams
from loramux.engine.sequence import Sequence

BASE = chain_seed(None, 0)


def seq(tokens: list[int], seed: bytes = BASE, adapter: str | None = None, virtual: int = 0) -> Sequence:
    s = Sequence("r", list(tokens), SamplingParams(max_tokens=4), adapter_id=adapter)
    s.cache_seed, s.num_prefix_tokens = seed, virtual
    return s


def admit(blocks: BlockManager, s: Sequence) -> Sequence:
    """Allocate, then compute everything (as a step would), registering its full blocks."""
    assert blocks.can_allocate(s)
    blocks.allocate(s)
    blocks.cache_full_blocks(s, s.num_tokens)
    return s


def test_a_repeated_prefix_reuses_blocks_and_computes_only_the_rest():
    blocks = BlockManager(16, 4)
    first = admit(blocks, seq(list(range(10))))              # 2 full blocks + 2 tokens
    second = seq(list(range(8)) + [50, 51, 52])
    blocks.allocate(second)
    assert second.num_computed_tokens == 8
    assert second.block_table[:2] == first.block_table[:2] and second.block_table[2] != first.block_table[2]
    assert [blocks.ref_counts[b] for b in first.block_table[:2]] == [2, 2]
    assert blocks.num_used == 3 + 1                          # shared blocks counted once
    assert blocks.cache.stats[""].prompt_tokens == 21 and blocks.cache.stats[""].hit_tokens == 8


def test_a_fully_cached_prompt_still_computes_its_last_token():
    blocks = BlockManager(16, 4)
    admit(blocks, seq(list(range(8))))
    again = seq(list(range(8)))
    blocks.allocate(again)
    assert again.num_computed_tokens == 4                    # the block of the last token is computed again


def test_the_chain_keys_the_adapter_its_version_and_every_earlier_token():
    blocks = BlockManager(32, 4)
    tokens = list(range(12))
    admit(blocks, seq(tokens, chain_seed("a", 1), "a"))
    for other in (seq(tokens), seq(tokens, chain_seed("b", 1), "b"),   # the base model, another adapter,
                  seq(tokens, chain_seed("a", 2), "a"),                 # the same id re-registered,
                  seq([99] + tokens[1:], chain_seed("a", 1), "a")):     # one token earlier differs
        blocks.allocate(other)
        assert other.num_computed_tokens == 0
        blocks.free(other)
    hit = seq(tokens, chain_seed("a", 1), "a")
    blocks.allocate(hit)
    assert hit.num_computed_tokens == 8


def test_cached_blocks_outlive_their_sequence_and_are_evicted_lru_only_when_needed():
    blocks = BlockManager(7, 4)
    old = admit(blocks, seq(list(range(100, 108))))          # 2 blocks
    new = admit(blocks, seq(list(range(200, 208))))
    old_blocks = list(old.block_table)
    blocks.free(old)
    blocks.free(new)
    assert blocks.num_used == 0 and blocks.num_cached == 4 and blocks.num_free == 7
    big = admit(blocks, seq(list(range(300, 315))))          # 4 blocks: the 3 free, then the LRU one
    assert set(big.block_table) - {4, 5, 6} == {old_blocks[1]}   # old's tail (freed first, tail first)
    assert blocks.num_cached == 3 + 3                        # big's 3 full blocks registered
    again = seq(list(range(200, 208)) + [1])
    blocks.allocate(again)
    assert again.num_computed_tokens == 8                    # the newer chain survived


def test_free_puts_a_chains_tail_first_in_line_for_eviction():
    blocks = BlockManager(4, 4)
    s = admit(blocks, seq(list(range(12))))
    head, mid, tail = s.block_table
    blocks.free(s)
    assert list(blocks.cache.evictable) == [tail, mid, head]


def test_blocks_held_by_a_running_sequence_are_never_evicted():
    blocks = BlockManager(4, 4)
    running = admit(blocks, seq(list(range(8))))             # 2 blocks held
    assert not blocks.can_allocate(seq(list(range(50, 62))))  # needs 4 (3 + its first token): 2 free
    assert blocks.can_allocate(seq(list(range(50, 56))))
    assert all(blocks.ref_counts[b] == 1 for b in running.block_table)


def test_forget_step_drops_what_a_failed_step_registered():
    blocks = BlockManager(8, 4)
    kept = admit(blocks, seq(list(range(8))))
    blocks.begin_step()
    failed = seq(list(range(20, 28)))
    blocks.allocate(failed)
    blocks.cache_full_blocks(failed, 8)
    blocks.forget_step()
    assert blocks.num_cached == 2
    blocks.free(failed)
    blocks.free(kept)
    assert blocks.num_free == 8 and blocks.num_cached == 2
    retry = seq(list(range(20, 28)))
    blocks.allocate(retry)
    assert retry.num_computed_tokens == 0


def test_prefix_adapter_virtual_tokens_are_a_shared_chain_head():
    blocks = BlockManager(16, 4)
    seed = chain_seed("pfx", 3)
    p1 = admit(blocks, seq([5, 6, 7], seed, "pfx", virtual=9))     # 12 logical tokens: 3 blocks
    p2 = seq([8, 9, 10], seed, "pfx", virtual=9)
    blocks.allocate(p2)
    assert p2.block_table[:2] == p1.block_table[:2] and p2.block_table[2] != p1.block_table[2]
    assert p2.num_computed_tokens == 8                        # 8 virtual rows already in the cache
    assert blocks.cache.stats["pfx"].hit_tokens == 0          # virtual tokens are not prompt tokens
    blocks.free(p1)
    blocks.free(p2)
    assert blocks.num_used == 0


def test_counts_only_what_is_asked_when_caching_is_off():
    blocks = BlockManager(8, 4, enable_prefix_caching=False)
    a = admit(blocks, seq(list(range(8))))
    b = seq(list(range(8)))
    blocks.allocate(b)
    assert b.num_computed_tokens == 0 and not set(a.block_table) & set(b.block_table)
    blocks.free(a)
    blocks.free(b)
    assert blocks.num_free == 8 and blocks.num_cached == 0


def test_decoded_tokens_fill_blocks_that_are_cached_too():
    blocks = BlockManager(8, 4)
    s = admit(blocks, seq(list(range(3))))
    for t in (40, 41, 42):                                   # a decode step per token
        s.output_token_ids.append(t)
        blocks.append_slot(s)
        blocks.cache_full_blocks(s, s.num_tokens)
    assert s.num_hashed_blocks == 1
    turn2 = seq(list(range(3)) + [40, 41, 42, 43])
    blocks.allocate(turn2)
    assert turn2.num_computed_tokens == 4
