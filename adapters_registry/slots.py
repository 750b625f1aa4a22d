"""Device slots: the stacked LoRA tensors the kernels read, and which adapter sits in each slot.

For every layer l and target module m the kernels take
    A[l][m]      (S, r_max, d_in)   lora_A of the adapter in each slot, rows >= its rank are zero
    B[l][m]      (S, d_out, r_max)  lora_B, columns >= its rank are zero
    scale[l][m]  (S,) float32       alpha / r (or alpha / sqrt(r)) for THIS module; 0 if not adapted
so `y += scale[s] * (x @ A[s].T) @ B[s].T` is exact for every slot s whatever its rank: the zero
padding contributes nothing. Allocated once for all 7 targets, so loading an adapter is a copy,
never an allocation, and tensor identities stay fixed for the engine (and CUDA graphs).

A and B are transposed views of row-major storage, (S, d_in, r_max) and (S, r_max, d_out): every
(slot, input feature) row of A and (slot, rank) row of B is contiguous, which is what the CPU
path's embedding-bag kernels read in place (``kernels.torch_ops``); Triton takes any strides.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

import torch

from engine.models.spec import LORA_TARGETS, ModelSpec

from .peft_lora import LoraWeights

T = TypeVar("T")


class LoraStacks:
    def __init__(self, spec: ModelSpec, num_slots: int, max_rank: int, *,
                 dtype: torch.dtype, device: torch.device):
        self.num_slots, self.max_rank = num_slots, max_rank
        self.A: list[dict[str, torch.Tensor]] = []
        self.B: list[dict[str, torch.Tensor]] = []
        self.scale: list[dict[str, torch.Tensor]] = []
        for _ in range(spec.num_layers):
            a, b, s = {}, {}, {}
            for m in LORA_TARGETS:
                d_in, d_out = spec.lora_dims(m)
                a[m] = torch.zeros(num_slots, d_in, max_rank, dtype=dtype, device=device).transpose(1, 2)
                b[m] = torch.zeros(num_slots, max_rank, d_out, dtype=dtype, device=device).transpose(1, 2)
                s[m] = torch.zeros(num_slots, dtype=torch.float32, device=device)           # (S,)
            self.A.append(a)
            self.B.append(b)
            self.scale.append(s)
        self.slot_rank = [0] * num_slots  # largest rank loaded in each slot (0: empty); lets kernels trim r_max
        # Target modules of the adapter in each slot: a step skips the modules none of its adapters has.
        self.slot_modules: list[frozenset[str]] = [frozenset()] * num_slots

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in (*self.A, *self.B, *self.scale) for t in layer.values())

    @torch.no_grad()
    def write(self, slot: int, weights: LoraWeights) -> None:
        """Overwrite `slot` with an adapter: its modules copied in, everything else zero."""
        scales = {(m.layer, m.module): (m.rank, m.scale) for m in weights.manifest.modules}
        for layer in range(len(self.A)):
            for m in LORA_TARGETS:
                a, b = self.A[layer][m][slot], self.B[layer][m][slot]
                entry = scales.get((layer, m))
                if entry is None:
                    a.zero_()
                    b.zero_()
                    self.scale[layer][m][slot] = 0.0
                    continue
                r, scale = entry
                a[:r].copy_(weights.A[(layer, m)])
                a[r:].zero_()
                b[:, :r].copy_(weights.B[(layer, m)])
                b[:, r:].zero_()
                self.scale[layer][m][slot] = scale
        self.slot_rank[slot] = weights.manifest.rank
        self.slot_modules[slot] = frozenset(module for _, module in scales)

    def clear(self, slot: int) -> None:
        """Mark `slot` empty (its tensors are overwritten by the next write)."""
        self.slot_rank[slot] = 0
        self.slot_modules[slot] = frozenset()


class SlotTable(Generic[T]):
    """Who owns each slot, and which slot to (re)use: an empty one first, else the least recently
    used slot whose owner is idle. Torch-free; the registry decides what "idle" means (no leases).
    """

    def __init__(self, num_slots: int):
        self.owner: list[T | None] = [None] * num_slots
        self._lru: OrderedDict[int, None] = OrderedDict((s, None) for s in range(num_slots))  # oldest first

    def victim(self, is_idle: Callable[[T], bool]) -> int | None:
        for slot, owner in enumerate(self.owner):
            if owner is None:
                return slot
        for slot in self._lru:
            if is_idle(self.owner[slot]):
                return slot
        return None

    def assign(self, slot: int, owner: T) -> None:
        self.owner[slot] = owner
        self.touch(slot)

    def touch(self, slot: int) -> None:
        self._lru.move_to_end(slot)

    def free(self, slot: int) -> None:
        self.owner[slot] = None
        self._lru.move_to_end(slot, last=False)  # reuse freed slots first
