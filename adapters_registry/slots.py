"""Device slots: the stacked LoRA tensors the kernels read, and which adapter sits in each slot.

Projections that read the same input share one shrink (``SHRINK_GROUPS``: q/k/v, gate/up, then o
and down alone), so their A matrices live side by side in one storage per group and layer::

    A_rows  (S, d_in, r_max, G)   A_rows[s, k, j, i] = lora_A[j, k] of the group's i-th module

Every (slot, input feature) row is contiguous and its first ``r * G`` entries are ranks < r of all
G modules: a rank-trimmed group view ``shrink_A(layer, group, r)`` (S, r * G, d_in) is a strided
view (rank j of module i is column ``j * G + i`` of the shrink output), and its rows are what the
CPU path's embedding bag reads in place (``kernels.torch_ops``); Triton takes any strides.

    B[l][m]  (S, d_out, r_max)  scale * lora_B, a transposed view of row-major (S, r_max, d_out)

The LoRA scale (alpha / r, or alpha / sqrt(r)) is folded into B when a slot is written, so one
shrink serves modules of different scales; the kernels are called with ``scale=None``. Padding beyond
an adapter's rank is zero, so ``y += (x @ A[s].T) @ B[s].T`` is exact whatever its rank.
Allocated once for all 7 targets, so loading an adapter is a copy, never an allocation, and tensor
identities stay fixed for the engine (and CUDA graphs).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

import torch

from loramux.engine.models.spec import LORA_TARGETS, SHRINK_GROUPS, ModelSpec

from .dora_slots import DoraFactors
from .peft_lora import LoraWeights

T = TypeVar("T")


class LoraStacks:
    def __init__(self, spec: ModelSpec, num_slots: int, max_rank: int, *,
                 dtype: torch.dtype, device: torch.device):
        self.num_slots, self.max_rank = num_slots, max_rank
        self.A_rows: list[dict[tuple[str, ...], torch.Tensor]] = []   # per layer and group: (S, d_in, r_max, G)
        self.A: list[dict[str, torch.Tensor]] = []                    # per module: (S, r_max, d_in) views
        self.B: list[dict[str, torch.Tensor]] = []
        for _ in range(spec.num_layers):
            rows, a, b = {}, {}, {}
            for group in SHRINK_GROUPS:
                d_in = spec.lora_dims(group[0])[0]
                rows[group] = torch.zeros(num_slots, d_in, max_rank, len(group), dtype=dtype, device=device)
                for i, m in enumerate(group):
                    a[m] = rows[group][..., i].transpose(1, 2)
                    b[m] = torch.zeros(num_slots, max_rank, spec.lora_dims(m)[1], dtype=dtype,
                                       device=device).transpose(1, 2)
            self.A_rows.append(rows)
            self.A.append(a)
            self.B.append(b)
        self.slot_rank = [0] * num_slots  # largest rank loaded in each slot (0: empty); lets kernels trim r_max
        # Target modules of the adapter in each slot: a step skips the modules none of its adapters has.
        self.slot_modules: list[frozenset[str]] = [frozenset()] * num_slots
        self._views: dict[tuple, torch.Tensor] = {}
        # Per slot, the rank of each (layer, module) written into it: beyond these, the slot is zero.
        self._written: list[dict[tuple[int, str], int]] = [{} for _ in range(num_slots)]
        self.dora = DoraFactors(spec, num_slots, device)  # DoRA adapters' factors, per slot

    @property
    def nbytes(self) -> int:
        return (sum(t.numel() * t.element_size() for layer in (*self.A_rows, *self.B) for t in layer.values())
                + self.dora.nbytes)

    @staticmethod
    def slot_nbytes(spec: ModelSpec, max_rank: int, dtype: torch.dtype) -> int:
        """Bytes of one slot: A and B at rank `max_rank` for all 7 targets of every layer, and its
        DoRA factors."""
        per_rank = sum(sum(spec.lora_dims(m)) for m in LORA_TARGETS)            # d_in + d_out per module
        return (spec.num_layers * per_rank * max_rank * torch.empty((), dtype=dtype).element_size()
                + DoraFactors.slot_nbytes(spec))

    @classmethod
    def count_for(cls, spec: ModelSpec, max_rank: int, dtype: torch.dtype, memory_bytes: int) -> int:
        """How many slots `memory_bytes` holds (at least one)."""
        return max(1, memory_bytes // cls.slot_nbytes(spec, max_rank, dtype))

    def shrink_A(self, layer: int, group: tuple[str, ...], rank: int) -> torch.Tensor:
        """(S, rank * G, d_in): the group's A matrices trimmed to `rank`, column j * G + i of the
        shrink output being rank j of module i. Views are cached: one per (layer, group, rank)."""
        key = ("A", layer, group, rank)
        view = self._views.get(key)
        if view is None:
            rows = self.A_rows[layer][group]
            S, d_in, _, G = rows.shape
            view = self._views[key] = rows[:, :, :rank].reshape(S, d_in, rank * G).transpose(1, 2)
        return view

    def expand_B(self, layer: int, module: str, rank: int) -> torch.Tensor:
        """(S, d_out, rank): the module's B trimmed to `rank` (cached view)."""
        key = ("B", layer, module, rank)
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = self.B[layer][module][:, :, :rank]
        return view

    @torch.no_grad()
    def write(self, slot: int, weights: LoraWeights) -> None:
        """Overwrite `slot` with an adapter: its modules copied in (B scaled), everything else zero.
        Only what the slot's previous adapter wrote beyond this one's ranks is zeroed (the rest is
        zero already, or overwritten): a slot cycling adapters of one shape zeroes nothing."""
        scales = {(m.layer, m.module): (m.rank, m.scale) for m in weights.manifest.modules}
        for (layer, m), old_rank in self._written[slot].items():
            r = scales.get((layer, m), (0, 0.0))[0]
            if old_rank > r:
                self.A[layer][m][slot][r:old_rank].zero_()
                self.B[layer][m][slot][:, r:old_rank].zero_()
        for (layer, m), (r, scale) in scales.items():
            self.A[layer][m][slot][:r].copy_(weights.A[(layer, m)])
            self.B[layer][m][slot][:, :r].copy_(weights.B[(layer, m)].float() * scale)
        self._written[slot] = {key: r for key, (r, _) in scales.items()}
        self.slot_rank[slot] = weights.manifest.rank
        self.slot_modules[slot] = frozenset(module for _, module in scales)
        self.dora.write(slot, weights)

    def clear(self, slot: int) -> None:
        """Mark `slot` empty (its tensors are overwritten by the next write)."""
        self.slot_rank[slot] = 0
        self.slot_modules[slot] = frozenset()
        self.dora.clear(slot)


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
