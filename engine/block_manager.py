"""Paged KV cache bookkeeping: which fixed-size blocks each sequence owns. No torch here.

Blocks are reference-counted so that the full blocks holding a prefix-tuning adapter's virtual
tokens are shared by every running sequence of that adapter: written once, read by all.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Hashable

from loramux.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks
        self.shared: dict[Hashable, list[int]] = {}      # prefix key -> full blocks of its virtual tokens
        self._shared_key: dict[int, Hashable] = {}       # first shared block -> key

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _shared_blocks(self, seq: Sequence) -> int:
        return seq.num_prefix_tokens // self.block_size if seq.prefix_key is not None else 0

    def can_allocate(self, seq: Sequence) -> bool:
        n_shared = self._shared_blocks(seq)
        reused = n_shared if seq.prefix_key in self.shared else 0
        return self.blocks_needed(seq.num_tokens + 1) - reused <= self.num_free

    def allocate(self, seq: Sequence) -> None:
        """Own enough blocks for every token of `seq`, sharing its prefix adapter's full blocks.

        Sets `seq.prefix_rows_written`: how many virtual-token rows already sit in the cache
        (the shared blocks, when another sequence of the adapter put them there).
        """
        n_shared = self._shared_blocks(seq)
        table: list[int] = []
        seq.prefix_rows_written = 0
        if n_shared:
            blocks = self.shared.get(seq.prefix_key)
            if blocks is None:
                blocks = [self.free_blocks.popleft() for _ in range(n_shared)]
                self.shared[seq.prefix_key] = blocks
                self._shared_key[blocks[0]] = seq.prefix_key
            else:
                seq.prefix_rows_written = n_shared * self.block_size
            table.extend(blocks)
        need = self.blocks_needed(seq.num_tokens) - len(table)
        if need > self.num_free:
            raise RuntimeError("out of KV blocks")
        table.extend(self.free_blocks.popleft() for _ in range(need))
        for b in table:
            self.ref_counts[b] += 1
        seq.block_table = table

    def can_append(self, seq: Sequence) -> bool:
        """Room for one more token (the decode step's new KV)?"""
        return self.blocks_needed(seq.num_tokens) <= len(seq.block_table) or self.num_free > 0

    def append_slot(self, seq: Sequence) -> None:
        if self.blocks_needed(seq.num_tokens) > len(seq.block_table):
            block = self.free_blocks.popleft()
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        for b in seq.block_table:
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                key = self._shared_key.pop(b, None)
                if key is not None:
                    del self.shared[key]
                self.free_blocks.append(b)
        seq.block_table = []
        seq.num_computed_tokens = 0
