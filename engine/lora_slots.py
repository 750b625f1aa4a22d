"""What the engine reads of the adapters' device slots: a Protocol, so the engine needs no registry.

adapters_registry.LoraStacks implements it; the registry writes the slots, the engine only reads
them, trimmed to the largest rank among a step's adapters.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch


class LoraSlots(Protocol):
    @property
    def slot_rank(self) -> Sequence[int]:
        """Largest rank of the adapter in each slot (0: empty)."""

    @property
    def slot_modules(self) -> Sequence[frozenset[str]]:
        """Target modules of the adapter in each slot."""

    def shrink_A(self, layer: int, group: tuple[str, ...], rank: int) -> torch.Tensor:
        """(S, rank * G, d_in): A of the group's G modules, column j * G + i of the shrink output
        being rank j of module i."""

    def expand_B(self, layer: int, module: str, rank: int) -> torch.Tensor:
        """(S, d_out, rank): B of one module, the LoRA scale folded in."""
