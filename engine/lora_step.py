"""One step's LoRA plan, built once by the model runner and used by every layer.

vLLM's ``PunicaWrapper.update_metadata`` then ``add_lora_linear`` over all slices is the model:
everything fixed for the step (which slot each token uses, the strategy, the largest rank, the
modules any adapter of the step targets, the trimmed stack views' layout) is decided here, once;
a layer only calls ``plan.add(x, y, layer, group)``, one kernel call for all of a fused
projection's slices.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from loramux.engine.lora_slots import LoraSlots
from loramux.engine.models.spec import SHRINK_GROUPS, ModelSpec
from loramux.kernels import ops as kernels


@dataclass(frozen=True)
class LoraStep:
    slots: LoraSlots
    mapping: kernels.LoraMapping
    rank: int                                   # largest rank of the step's adapters: views trimmed to it
    strategy: str                               # kernels.pick_strategy, once
    # per shrink group: (module, its index in the group, its column offset in the fused output) for
    # the modules some adapter of the step targets; groups no adapter targets are skipped
    expands: tuple[tuple[tuple[str, int, int], ...], ...]
    # per shrink group: whether an adapter of the step has DoRA modules there (its fused output is
    # then scaled by each token's slot's factors after the expands; never otherwise)
    dora: tuple[bool, ...]

    @classmethod
    def build(cls, token_slots: list[int], slots: LoraSlots | None, spec: ModelSpec, device: torch.device,
              decode: bool, per_token: bool = False) -> LoraStep | None:
        """The plan for a step whose tokens use `token_slots` (-1: the bare base model); None when no
        token uses an adapter. `per_token` (batch-invariant mode, CPU): the embedding bags even when
        every token has the same adapter, so a token's LoRA is computed alike in any batch."""
        used = {s for s in token_slots if s >= 0}
        if not used:
            return None
        rank = max(slots.slot_rank[s] for s in used)
        modules = frozenset().union(*(slots.slot_modules[s] for s in used))
        mapping = kernels.LoraMapping.from_slots(torch.tensor(token_slots, dtype=torch.long, device=device),
                                                 decode=decode)
        expands = tuple(tuple((m, i, off) for i, (m, off) in enumerate(zip(group, spec.group_offsets(group)))
                              if m in modules) for group in SHRINK_GROUPS)
        strategy = kernels.pick_strategy(mapping, slots.shrink_A(0, SHRINK_GROUPS[0], rank))
        if per_token and strategy == "single" and device.type == "cpu":
            strategy = "bagged"                      # the registry's slots are laid out for the bags
        dora_groups = frozenset().union(*(slots.dora.slot_groups[s] for s in used))
        dora = tuple(g in dora_groups for g in range(len(SHRINK_GROUPS)))
        return cls(slots, mapping, rank, strategy, expands, dora)

    def add(self, x: torch.Tensor, y: torch.Tensor, layer: int, group: int) -> None:
        """y[:, slice of module m] += scale * (x A_m[slot]^T) B_m[slot]^T, per token, for the modules
        of SHRINK_GROUPS[group] the step's adapters target (y is the group's fused output); then, in
        a group where some adapter of the step has DoRA, y[i] *= its slot's factors (1 for others)."""
        expands = self.expands[group]
        if not expands:
            return
        r, slots = self.rank, self.slots
        kernels.add_lora_group(y, x, slots.shrink_A(layer, SHRINK_GROUPS[group], r),
                               [(slots.expand_B(layer, m, r), i, off) for m, i, off in expands],
                               self.mapping, self.strategy,
                               slots.dora.factors(layer, group) if self.dora[group] else None)
