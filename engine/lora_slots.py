"""What the engine and the adapters' device slots see of each other: Protocols, so neither package
imports the other's classes.

adapters_registry.LoraStacks implements LoraSlots (with its DoraFactors as DoraSlots): the registry
writes the slots, the engine only reads them, trimmed to the largest rank among a step's adapters.
The engine's model implements BaseWeights: the registry reads the base weights from it to compute
a DoRA adapter's factors.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch


class DoraSlots(Protocol):
    @property
    def slot_groups(self) -> Sequence[frozenset[int]]:
        """Per slot, the indices of SHRINK_GROUPS in which its adapter has DoRA modules."""

    def factors(self, layer: int, group: int) -> torch.Tensor:
        """(S, d_group) float32: per slot, the DoRA factors of the fused output of SHRINK_GROUPS[group]
        (1 where the slot's adapter has no DoRA)."""


class LoraSlots(Protocol):
    @property
    def slot_rank(self) -> Sequence[int]:
        """Largest rank of the adapter in each slot (0: empty)."""

    @property
    def slot_modules(self) -> Sequence[frozenset[str]]:
        """Target modules of the adapter in each slot."""

    @property
    def dora(self) -> DoraSlots:
        """The slots' DoRA factors."""

    def shrink_A(self, layer: int, group: tuple[str, ...], rank: int) -> torch.Tensor:
        """(S, rank * G, d_in): A of the group's G modules, column j * G + i of the shrink output
        being rank j of module i."""

    def expand_B(self, layer: int, module: str, rank: int) -> torch.Tensor:
        """(S, d_out, rank): B of one module, the LoRA scale folded in."""


class BaseWeights(Protocol):
    def dequantized_weight(self, layer: int, group: int) -> torch.Tensor:
        """float32 (sum of d_out, d_in): the fused projection of SHRINK_GROUPS[group] in `layer`, the
        weight it multiplies by, dequantized from its resident form (DoRA's weight norm reads it)."""
