"""Device slots of DoRA factors, next to the LoRA stacks (slots.LoraStacks holds one).

    factors[l][g]  (S, d_g) float32    f of slot s's adapter over the fused output of SHRINK_GROUPS[g]
                                       (q|k|v, o, gate|up, down), 1 wherever that adapter has no DoRA

One row per slot and fused projection, so a step multiplies each token's whole fused output by
its slot's row in one gathered op (``kernels.lora_scale_rows``); tokens of plain LoRA adapters
get rows of ones (exact), and steps without a DoRA adapter skip the op. float32 whatever the
engine dtype: the product rounds once, to the output's dtype. Allocated once, like the stacks.
"""
from __future__ import annotations

import torch

from loramux.engine.models.spec import SHRINK_GROUPS, ModelSpec

from .peft_lora import LoraWeights


def _fused_widths(spec: ModelSpec) -> list[int]:
    return [spec.group_offsets(g)[-1] + spec.lora_dims(g[-1])[1] for g in SHRINK_GROUPS]


class DoraFactors:
    def __init__(self, spec: ModelSpec, num_slots: int, device: torch.device):
        self.spec = spec
        widths = _fused_widths(spec)
        self._factors = [[torch.ones(num_slots, w, dtype=torch.float32, device=device) for w in widths]
                         for _ in range(spec.num_layers)]
        # Groups (indices of SHRINK_GROUPS) with DoRA modules of the adapter in each slot: a step
        # scales only those; and the (layer, group) rows each slot holds that are not all ones.
        self.slot_groups: list[frozenset[int]] = [frozenset()] * num_slots
        self._written: list[set[tuple[int, int]]] = [set() for _ in range(num_slots)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self._factors for t in layer)

    @staticmethod
    def slot_nbytes(spec: ModelSpec) -> int:
        """Bytes of one slot's factors: a float32 row per layer and fused projection."""
        return spec.num_layers * sum(_fused_widths(spec)) * 4

    def factors(self, layer: int, group: int) -> torch.Tensor:
        """(S, d_group) float32: per slot, the factors of the fused output of SHRINK_GROUPS[group]."""
        return self._factors[layer][group]

    @torch.no_grad()
    def write(self, slot: int, weights: LoraWeights) -> None:
        """Slot `slot` now holds `weights`: its DoRA factors in, ones everywhere else."""
        for layer, g in self._written[slot]:
            self._factors[layer][g][slot].fill_(1.0)
        written = set()
        for (layer, module), f in weights.dora_factors.items():
            g = next(i for i, group in enumerate(SHRINK_GROUPS) if module in group)
            offset = self.spec.group_offsets(SHRINK_GROUPS[g])[SHRINK_GROUPS[g].index(module)]
            self._factors[layer][g][slot, offset:offset + f.shape[0]].copy_(f)
            written.add((layer, g))
        self._written[slot] = written
        self.slot_groups[slot] = frozenset(g for _, g in written)

    def clear(self, slot: int) -> None:
        """Mark `slot` empty (its rows are reset by the next write)."""
        self.slot_groups[slot] = frozenset()
