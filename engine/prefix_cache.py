"""Automatic prefix caching: which KV blocks hold which content. No torch here.

A full block's key is a hash chain over everything that determined its K/V: the adapter that
produced them (its id and the version of its weights, since a LoRA changes every later layer's
K/V; the base model has its own seed), then the tokens of every block up to and including this
one. A prefix-tuning adapter's virtual tokens are the chain's first tokens (as -1, -2, ...), so its
virtual-token blocks are shared like any prompt prefix. Re-registering an id gives new weights a
new version, hence new keys: blocks computed with the old weights can never be found again, and
age out of the LRU.

sha256, not Python's hash: a key collision would hand one request another's KV, so keys must not
be forgeable by a client choosing its prompt.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


def chain_seed(adapter_id: str | None, version: int) -> bytes:
    """The first link of a chain: which weights computed the blocks (adapter None: the base model)."""
    return hashlib.sha256(f"loramux-kv\0{adapter_id or ''}\0{version}".encode()).digest()


def block_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The key of a full block: its parent's key and its own tokens."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


@dataclass
class CacheStats:
    """Per adapter: prompt tokens asked for and how many of them came from the cache."""
    prompt_tokens: int = 0
    hit_tokens: int = 0


class PrefixCache:
    """key -> block for full blocks whose KV sits in the cache, and the LRU order of those no
    sequence holds (evicted, oldest first, only when no free block is left)."""

    def __init__(self) -> None:
        self.block_of: dict[bytes, int] = {}
        self.key_of: dict[int, bytes] = {}
        self.label_of: dict[int, str] = {}                       # block -> adapter label, for metrics
        self.evictable: OrderedDict[int, None] = OrderedDict()   # cached and unreferenced: LRU first
        self.blocks_per_label: Counter[str] = Counter()
        self.stats: dict[str, CacheStats] = {}

    def __len__(self) -> int:
        return len(self.key_of)

    def lookup(self, key: bytes) -> int | None:
        return self.block_of.get(key)

    def insert(self, block: int, key: bytes, label: str) -> bool:
        """Register `block` as holding `key`; False (nothing changes) when another block already does."""
        if key in self.block_of:
            return False
        self.block_of[key], self.key_of[block], self.label_of[block] = block, key, label
        self.blocks_per_label[label] += 1
        return True

    def remove(self, block: int) -> None:
        """Forget what `block` holds (it is about to be overwritten, or its KV is not valid)."""
        key = self.key_of.pop(block)
        del self.block_of[key]
        label = self.label_of.pop(block)
        self.blocks_per_label[label] -= 1
        if not self.blocks_per_label[label]:
            del self.blocks_per_label[label]
        self.evictable.pop(block, None)

    def evict_lru(self) -> int | None:
        """The least recently used unreferenced cached block, forgotten; None if there is none."""
        if not self.evictable:
            return None
        block = next(iter(self.evictable))
        self.remove(block)
        return block

    def record(self, label: str, prompt_tokens: int, hit_tokens: int) -> None:
        s = self.stats.setdefault(label, CacheStats())
        s.prompt_tokens += prompt_tokens
        s.hit_tokens += hit_tokens
