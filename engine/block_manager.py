"""Paged KV cache bookkeeping: which fixed-size blocks each sequence owns. No torch here."""
from __future__ import annotations

from collections import deque

from engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq: Sequence, num_prefix_tokens: int = 0) -> bool:
        need = self.blocks_needed(seq.num_tokens + num_prefix_tokens + 1) - len(seq.block_table)
        return need <= self.num_free

    def allocate(self, seq: Sequence) -> None:
        """Own enough blocks for every token of `seq` (including its virtual prefix)."""
        need = self.blocks_needed(seq.num_tokens) - len(seq.block_table)
        if need > self.num_free:
            raise RuntimeError("out of KV blocks")
        seq.block_table.extend(self.free_blocks.popleft() for _ in range(need))

    def can_append(self, seq: Sequence) -> bool:
        """Room for one more token (the decode step's new KV)?"""
        return self.blocks_needed(seq.num_tokens) <= len(seq.block_table) or self.num_free > 0

    def append_slot(self, seq: Sequence) -> None:
        if self.blocks_needed(seq.num_tokens) > len(seq.block_table):
            seq.block_table.append(self.free_blocks.popleft())

    def free(self, seq: Sequence) -> None:
        self.free_blocks.extend(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0

    def slot(self, seq: Sequence, logical_index: int) -> int:
        """Flat cache row of a logical token position."""
        block = seq.block_table[logical_index // self.block_size]
        return block * self.block_size + logical_index % self.block_size
