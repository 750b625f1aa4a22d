"""Turns a scheduled batch into one flat forward pass: token ids, positions, KV rows, adapter slots."""
from __future__ import annotations

import torch

from loramux import kernels
from loramux.engine.attention import AttentionMetadata, KVCache, PrefillSpan
from loramux.engine.block_manager import BlockManager
from loramux.engine.lora_slots import LoraSlots
from loramux.engine.models.llama import ForwardContext, LlamaModel
from loramux.engine.scheduler import ScheduledBatch
from loramux.engine.sequence import Sequence


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: KVCache, blocks: BlockManager, device: torch.device,
                 lora_stacks: LoraSlots | None = None) -> None:
        self.model = model
        self.kv = kv
        self.blocks = blocks
        self.device = device
        self.lora_stacks = lora_stacks

    def _slots(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        """Cache rows of logical positions start..end-1 of `seq`."""
        idx = torch.arange(start, end)
        table = torch.tensor(seq.block_table, dtype=torch.long)
        return table[idx // self.blocks.block_size] * self.blocks.block_size + idx % self.blocks.block_size

    def _write_prefix(self, seq: Sequence) -> None:
        """Put a prefix-tuning adapter's virtual-token KV (computed once, at registration) in the cache.

        Rows in blocks shared with other running sequences of the adapter are skipped when those
        sequences already wrote them; only the partial last block is the sequence's own copy.
        """
        prefix = seq.lease.prefix_kv                                     # (L, 2, n_virt, nkv, hd)
        start, end = seq.prefix_rows_written, seq.num_prefix_tokens
        rows = self._slots(seq, start, end).to(self.device)
        for layer in range(prefix.shape[0]):
            self.kv.k[layer].index_copy_(0, rows, prefix[layer, 0, start:end].to(self.kv.k[layer].dtype))
            self.kv.v[layer].index_copy_(0, rows, prefix[layer, 1, start:end].to(self.kv.v[layer].dtype))
        seq.num_computed_tokens = seq.num_prefix_tokens

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, ForwardContext, torch.Tensor]:
        ids: list[int] = []
        positions: list[torch.Tensor] = []
        slot_mapping: list[torch.Tensor] = []
        token_slots: list[int] = []
        spans: list[PrefillSpan] = []
        logit_rows: list[int] = []
        for seq in batch.prefills:
            if seq.num_computed_tokens < seq.num_prefix_tokens:
                self._write_prefix(seq)
            start, end = seq.num_computed_tokens, seq.num_tokens
            row = len(ids)
            ids.extend(seq.uncomputed_token_ids())
            positions.append(torch.arange(start, end))
            slot_mapping.append(self._slots(seq, start, end))
            token_slots.extend([seq.lora_slot] * (end - start))
            if start == 0:
                spans.append(PrefillSpan(row, len(ids), None, None))
            else:
                q_pos = torch.arange(start, end).unsqueeze(1)                       # (q, 1)
                mask = torch.arange(end).unsqueeze(0) <= q_pos                       # (q, ctx)
                spans.append(PrefillSpan(row, len(ids), self._slots(seq, 0, end).to(self.device),
                                         mask.to(self.device)))
            logit_rows.append(len(ids) - 1)
        decode_start = len(ids)
        decode_slots = decode_mask = None
        if batch.decodes:
            max_ctx = max(s.num_tokens for s in batch.decodes)
            decode_slots = torch.zeros(len(batch.decodes), max_ctx, dtype=torch.long)
            decode_mask = torch.zeros(len(batch.decodes), 1, 1, max_ctx, dtype=torch.bool)
            for i, seq in enumerate(batch.decodes):
                n = seq.num_tokens
                ids.append(seq.token_at(n - 1))
                positions.append(torch.tensor([n - 1]))
                ctx_slots = self._slots(seq, 0, n)
                slot_mapping.append(ctx_slots[-1:])
                decode_slots[i, :n] = ctx_slots
                decode_mask[i, ..., :n] = True
                token_slots.append(seq.lora_slot)
                logit_rows.append(len(ids) - 1)
            # An additive mask in the model dtype, built once per step (SDPA would convert a bool one per layer).
            decode_mask = torch.zeros(decode_mask.shape, dtype=self.kv.k[0].dtype).masked_fill_(
                ~decode_mask, float("-inf"))
            decode_slots, decode_mask = decode_slots.to(self.device), decode_mask.to(self.device)
        dev = self.device
        attn = AttentionMetadata(
            slot_mapping=torch.cat(slot_mapping).to(dev), prefills=spans, decode_start=decode_start,
            decode_slots=decode_slots, decode_mask=decode_mask)
        lora, rank, modules = None, 0, frozenset()
        used = {s for s in token_slots if s >= 0}
        if used:
            stacks = self.lora_stacks
            rank = max(stacks.slot_rank[s] for s in used)
            modules = frozenset().union(*(stacks.slot_modules[s] for s in used))
            lora = kernels.LoraMapping.from_slots(torch.tensor(token_slots, dtype=torch.long, device=dev),
                                                  decode=not batch.prefills)
        ctx = ForwardContext(positions=torch.cat(positions).to(dev), attn=attn, kv=self.kv, lora=lora,
                             lora_stacks=self.lora_stacks, lora_rank=rank, lora_modules=modules)
        return torch.tensor(ids, dtype=torch.long, device=dev), ctx, torch.tensor(logit_rows, device=dev)

    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Forward the batch; returns float32 logits [num_seqs, vocab] for each sequence's last token."""
        input_ids, ctx, logit_rows = self.prepare(batch)
        logits = self.model(input_ids, ctx, logit_rows)
        for seq in batch.sequences:
            seq.num_computed_tokens = seq.num_tokens
        return logits
