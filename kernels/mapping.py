"""LoraMapping: which adapter slot each token of one engine step uses, grouped once for every LoRA op.

The model runner builds one mapping per engine step and passes it to all
``num_layers x num_projections`` shrink/expand calls, so everything that depends only on the
token -> slot assignment (sorting, segment boundaries, host-side sizes for kernel grids) is
computed here exactly once instead of ~200 times.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Mean LoRA tokens per distinct adapter below which the gathered (BGMV) variant is picked when the
# caller does not say: with so little reuse of each adapter's weights, grouping buys nothing.
_GATHER_BELOW_TOKENS_PER_ADAPTER = 4


@dataclass(frozen=True, eq=False)
class LoraMapping:
    """Token -> adapter-slot assignment of one batch, plus its grouping by slot.

    Build with :meth:`from_slots`. All tensors live on the device of ``token_slots``; the ``*_host``
    fields are plain Python copies of the (small, per-adapter) segment tables, so the ops never
    need a device -> host sync.

    Layout (``T`` tokens, ``L`` of them with an adapter, ``G`` distinct adapters)::

        token_slots  (T,)  slot per token, -1 = base model only
        order        (L,)  indices of the LoRA tokens, stably sorted by slot
        sorted_slots (L,)  token_slots[order]
        seg_slots    (G,)  distinct slots, ascending
        seg_starts   (G,)  where each slot's run starts in ``order``
        seg_lens     (G,)  how many tokens use it
    """

    token_slots: torch.Tensor
    order: torch.Tensor
    sorted_slots: torch.Tensor
    seg_slots: torch.Tensor
    seg_starts: torch.Tensor
    seg_lens: torch.Tensor
    seg_slots_host: tuple[int, ...]
    seg_starts_host: tuple[int, ...]
    seg_lens_host: tuple[int, ...]
    num_tokens: int
    num_lora_tokens: int
    max_seg_len: int
    decode: bool
    # Tables derived lazily by the ops (see bags); per step, never global.
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_slots(cls, token_slots: torch.Tensor, *, decode: bool | None = None) -> LoraMapping:
        """Group ``token_slots`` (T,) by slot. ``decode`` picks the Triton variant, gathered BGMV (True)
        or segmented SGMV (False); ``None`` infers it from the mean number of tokens per adapter. The
        CPU path picks its own strategy from the grouping and ignores it.

        One device -> host copy of the per-adapter table happens here (once per step).
        """
        slots = torch.as_tensor(token_slots)
        if slots.dim() != 1:
            raise ValueError(f"token_slots must be 1-D, got shape {tuple(slots.shape)}")
        if slots.dtype.is_floating_point or slots.dtype == torch.bool:
            raise TypeError(f"token_slots must be an integer tensor, got {slots.dtype}")
        slots = slots.to(torch.long)
        sorted_all, order_all = torch.sort(slots, stable=True)  # -1 tokens sort first
        num_base = int((sorted_all < 0).sum())  # the one sync of the step
        if num_base and int(sorted_all[0]) < -1:
            raise ValueError(f"slot indices must be >= -1, got {int(sorted_all[0])}")
        order = order_all[num_base:]  # (L,)
        sorted_slots = sorted_all[num_base:]  # (L,)
        seg_slots, seg_lens = torch.unique_consecutive(sorted_slots, return_counts=True)  # (G,), (G,)
        seg_starts = torch.cumsum(seg_lens, 0) - seg_lens  # (G,) exclusive prefix sum
        lens_host = tuple(seg_lens.tolist())
        num_lora = len(slots) - num_base
        if decode is None:
            decode = num_lora < _GATHER_BELOW_TOKENS_PER_ADAPTER * max(1, len(lens_host))
        return cls(
            token_slots=slots,
            order=order,
            sorted_slots=sorted_slots,
            seg_slots=seg_slots,
            seg_starts=seg_starts,
            seg_lens=seg_lens,
            seg_slots_host=tuple(seg_slots.tolist()),
            seg_starts_host=tuple(seg_starts.tolist()),
            seg_lens_host=lens_host,
            num_tokens=len(slots),
            num_lora_tokens=num_lora,
            max_seg_len=max(lens_host, default=0),
            decode=bool(decode),
        )

    @property
    def any_lora(self) -> bool:
        """False when every slot is -1: the engine then skips LoRA entirely."""
        return self.num_lora_tokens > 0

    @property
    def all_lora(self) -> bool:
        """True when no token is base-model-only (no row needs zeroing or skipping)."""
        return self.num_lora_tokens == self.num_tokens

    @property
    def num_segments(self) -> int:
        return len(self.seg_slots_host)

    @property
    def single_slot(self) -> int | None:
        """The slot when every token uses the same adapter (two plain matmuls suffice), else None."""
        if self.num_segments == 1 and self.all_lora:
            return self.seg_slots_host[0]
        return None

    @property
    def max_slot(self) -> int:
        return self.seg_slots_host[-1] if self.seg_slots_host else -1

    @property
    def device(self) -> torch.device:
        return self.token_slots.device

    @property
    def lora_tokens(self) -> torch.Tensor:
        """(L,) positions of the LoRA tokens in token order (``order`` holds them sorted by slot)."""
        idx = self._cache.get("lora_tokens")
        if idx is None:
            idx = self._cache["lora_tokens"] = torch.nonzero(self.token_slots >= 0).squeeze(1)
        return idx

    @property
    def table_slots(self) -> torch.Tensor:
        """(T,) token slots with a base-model token's -1 replaced by a slot the batch uses: an index
        into per-slot tables (the scale) that reads only slots in use, whose entries are finite, so
        multiplying a base token's zero row by it keeps it zero."""
        s = self._cache.get("table_slots")
        if s is None:
            fill = self.seg_slots_host[0] if self.seg_slots_host else 0
            s = self._cache["table_slots"] = torch.where(self.token_slots < 0, fill, self.token_slots)
        return s

    def bags(self, rows_per_slot: int, rows_per_token: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices and offsets of an ``embedding_bag`` over a stack viewed as rows, ``rows_per_slot``
        rows per slot: each LoRA token's bag is the first ``rows_per_token`` rows of its slot, a
        base-model token's bag is empty (so its output row is zero)."""
        key = ("bags", rows_per_slot, rows_per_token)
        hit = self._cache.get(key)
        if hit is None:
            slots = self.token_slots
            is_lora = slots >= 0
            first_row = slots[is_lora] * rows_per_slot                                  # (L,)
            indices = (first_row.unsqueeze(1) + torch.arange(rows_per_token, device=slots.device)).reshape(-1)
            sizes = is_lora.long() * rows_per_token
            hit = self._cache[key] = (indices, torch.cumsum(sizes, 0) - sizes)
        return hit

    def check(self, num_tokens: int, num_slots: int) -> None:
        """Raise if this mapping cannot describe a batch of ``num_tokens`` against ``num_slots`` slots."""
        if num_tokens != self.num_tokens:
            raise ValueError(f"mapping has {self.num_tokens} tokens, tensors have {num_tokens}")
        if self.max_slot >= num_slots:
            raise IndexError(f"slot {self.max_slot} out of range for a stack of {num_slots} slots")


def as_mapping(mapping: LoraMapping | torch.Tensor) -> LoraMapping:
    """Accept a LoraMapping or a raw (T,) slot tensor (wrapped on the fly: fine for tests, but the
    engine should build the mapping once per step and reuse it)."""
    return mapping if isinstance(mapping, LoraMapping) else LoraMapping.from_slots(mapping)
