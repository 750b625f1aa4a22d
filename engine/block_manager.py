"""Paged KV cache bookkeeping: which fixed-size blocks each sequence owns. No torch here.

Blocks are reference-counted. With prefix caching (engine.prefix_cache) every full block a step
computes is registered under its content key; a new sequence starts with the blocks of its longest
cached prefix (refcount + 1, nothing recomputed) and computes from there. A cached block nobody
holds stays cached, in LRU order, until a free block is needed and none is left. Blocks a failed
step registered are forgotten (`forget_step`): their KV was never written.
"""
from __future__ import annotations

from collections import deque

from loramux.engine.prefix_cache import PrefixCache, block_hash
from loramux.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))   # never cached, or forgotten
        self.ref_counts = [0] * num_blocks
        self.cache = PrefixCache() if enable_prefix_caching else None
        self._step_cached: list[int] = []                         # registered by the current step

    @property
    def num_free(self) -> int:
        """Blocks a sequence may take: free ones and cached ones nobody holds."""
        return len(self.free_blocks) + (len(self.cache.evictable) if self.cache else 0)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks holding a registered full block (held by sequences or not)."""
        return len(self.cache) if self.cache else 0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache ------------------------------------------------------------------------------

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The chain keys of `seq`'s first `num_blocks` full blocks (extending seq.block_hashes)."""
        bs, hashes = self.block_size, seq.block_hashes
        for i in range(len(hashes), num_blocks):
            parent = hashes[-1] if hashes else seq.cache_seed
            hashes.append(block_hash(parent, [seq.hash_token(j) for j in range(i * bs, (i + 1) * bs)]))
        return hashes

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks holding `seq`'s longest cached prefix. Never the block of its last token: a step
        must compute at least that one to produce logits."""
        if self.cache is None or seq.cache_seed is None:
            return []
        hits = []
        for key in self._hashes(seq, (seq.num_tokens - 1) // self.block_size):
            block = self.cache.lookup(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def cache_full_blocks(self, seq: Sequence, computed_end: int) -> None:
        """Register `seq`'s full blocks below logical position `computed_end` (computed by the end
        of this step). A block whose content another block already holds stays private."""
        if self.cache is None or seq.cache_seed is None:
            return
        n = min(computed_end // self.block_size, len(seq.block_table))
        hashes = self._hashes(seq, n)
        label = seq.adapter_id or ""
        for i in range(seq.num_hashed_blocks, n):
            if self.cache.insert(seq.block_table[i], hashes[i], label):
                self._step_cached.append(seq.block_table[i])
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, n)

    def begin_step(self) -> None:
        self._step_cached.clear()

    def forget_step(self) -> None:
        """The step failed: what it registered holds no valid KV."""
        for block in self._step_cached:
            if self.cache is not None and block in self.cache.key_of:
                evictable = block in self.cache.evictable
                self.cache.remove(block)
                if evictable:
                    self.free_blocks.append(block)
        self._step_cached.clear()

    def forget_blocks(self, blocks: set[int]) -> set[int]:
        """Unregister the blocks among `blocks` this step registered (their KV was refused: not
        finite); returns them."""
        forgotten = {b for b in self._step_cached if b in blocks}
        for block in forgotten:
            if self.cache is not None and block in self.cache.key_of:
                self.cache.remove(block)
        self._step_cached = [b for b in self._step_cached if b not in forgotten]
        return forgotten

    # -- allocation --------------------------------------------------------------------------------

    def can_allocate(self, seq: Sequence) -> bool:
        """Room for every token of `seq` and its first generated one, reusing its cached prefix?"""
        hits = self._cached_prefix(seq)
        taken_from_lru = sum(1 for b in hits if self.ref_counts[b] == 0)   # hits that are not free any more
        return self.blocks_needed(seq.num_tokens + 1) - len(hits) <= self.num_free - taken_from_lru

    def allocate(self, seq: Sequence, *, count_stats: bool = True) -> None:
        """Own enough blocks for every token of `seq`, starting with its cached prefix's blocks.

        Sets `seq.num_computed_tokens` to the tokens whose KV those blocks already hold.
        """
        hits = self._cached_prefix(seq)
        for b in hits:
            if self.ref_counts[b] == 0:
                self.cache.evictable.pop(b)
            self.ref_counts[b] += 1
        need = self.blocks_needed(seq.num_tokens) - len(hits)
        if need > self.num_free:
            raise RuntimeError("out of KV blocks")
        seq.block_table = hits + [self._take() for _ in range(need)]
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_hashed_blocks = len(hits)
        if self.cache is not None and count_stats:
            prompt = len(seq.prompt_token_ids)
            hit = max(0, min(seq.num_computed_tokens - seq.num_prefix_tokens, prompt))
            self.cache.record(seq.adapter_id or "", prompt, hit)

    def _take(self) -> int:
        """A block for new KV: a free one, else the least recently used cached one nobody holds."""
        block = self.free_blocks.popleft() if self.free_blocks else self.cache.evict_lru()
        self.ref_counts[block] = 1
        return block

    def can_append(self, seq: Sequence) -> bool:
        """Room for one more token (the decode step's new KV)?"""
        return self.blocks_needed(seq.num_tokens) <= len(seq.block_table) or self.num_free > 0

    def append_slot(self, seq: Sequence) -> None:
        if self.blocks_needed(seq.num_tokens) > len(seq.block_table):
            seq.block_table.append(self._take())

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references. Its cached blocks stay cached, the last ones first in LRU order
        (a chain's tail is worth less than its head)."""
        for b in reversed(seq.block_table):
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                if self.cache is not None and b in self.cache.key_of:
                    self.cache.evictable[b] = None
                else:
                    self.free_blocks.append(b)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0
