"""Turns a scheduled batch into one flat forward pass: token ids, positions, KV rows, adapter slots.

The step's metadata is built once, from plain Python lists, into one tensor per field (nano-vllm's
way); every layer reuses it.
"""
from __future__ import annotations

import torch

from loramux.engine.attention import AttentionMetadata, KVCache, PrefillSpan
from loramux.engine.block_manager import BlockManager
from loramux.engine.lora_slots import LoraSlots
from loramux.engine.lora_step import LoraStep
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
        self.dtype = kv.k[0].dtype
        self.num_kv_heads = kv.k[0].shape[0]

    def _rows(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Cache rows of logical positions start..end-1 of `seq`."""
        bs, table = self.blocks.block_size, seq.block_table
        return [table[i // bs] * bs + i % bs for i in range(start, end)]

    def _write_prefix(self, seq: Sequence) -> None:
        """Put a prefix-tuning adapter's virtual-token KV (computed once, at registration) in the cache.

        Rows in blocks shared with other running sequences of the adapter are skipped when those
        sequences already wrote them; only the partial last block is the sequence's own copy.
        """
        prefix = seq.lease.prefix_kv                                     # (L, 2, n_virt, nkv, hd)
        start, end = seq.prefix_rows_written, seq.num_prefix_tokens
        rows = torch.tensor(self._rows(seq, start, end), device=self.device)
        for layer in range(prefix.shape[0]):
            self.kv.write(layer, rows, prefix[layer, 0, start:end].to(self.dtype),
                          prefix[layer, 1, start:end].to(self.dtype))
        seq.num_computed_tokens = seq.num_prefix_tokens

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, ForwardContext, torch.Tensor | None]:
        dev = self.device
        ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        token_slots: list[int] = []
        spans: list[PrefillSpan] = []
        logit_rows: list[int] = []
        for seq in batch.prefills:
            if seq.num_computed_tokens < seq.num_prefix_tokens:
                self._write_prefix(seq)
            start, end = seq.num_computed_tokens, seq.num_tokens
            row = len(ids)
            ids.extend(seq.uncomputed_token_ids())
            positions.extend(range(start, end))
            slot_mapping.extend(self._rows(seq, start, end))
            token_slots.extend([seq.lora_slot] * (end - start))
            if start == 0:
                spans.append(PrefillSpan(row, len(ids), None, None))
            else:                    # attends to cached context too (virtual prefix tokens)
                q_pos = torch.arange(start, end, device=dev).unsqueeze(1)                    # (q, 1)
                mask = torch.arange(end, device=dev).unsqueeze(0) <= q_pos                    # (q, ctx)
                spans.append(PrefillSpan(row, len(ids), torch.tensor(self._rows(seq, 0, end), device=dev), mask))
            logit_rows.append(len(ids) - 1)
        decode_start = len(ids)
        for seq in batch.decodes:
            n = seq.num_tokens
            ids.append(seq.token_at(n - 1))
            positions.append(n - 1)
            slot_mapping.extend(self._rows(seq, n - 1, n))
            token_slots.append(seq.lora_slot)
            logit_rows.append(len(ids) - 1)
        attn = AttentionMetadata(torch.tensor(slot_mapping, device=dev), spans, decode_start, None, None)
        if batch.decodes:
            self._decode_metadata(batch.decodes, attn)
        lora = LoraStep.build(token_slots, self.lora_stacks, self.model.spec, dev, decode=not batch.prefills)
        ctx = ForwardContext(positions=torch.tensor(positions, device=dev), attn=attn, kv=self.kv, lora=lora)
        rows = None if len(logit_rows) == len(ids) else torch.tensor(logit_rows, device=dev)   # None: every row
        return torch.tensor(ids, dtype=torch.long, device=dev), ctx, rows

    def _decode_metadata(self, seqs: list[Sequence], attn: AttentionMetadata) -> None:
        """The KV blocks of each decode sequence's whole context, padded to the longest, and the
        additive mask of every row that is not one of its tokens, in the layout paged_attention's
        decode path reads."""
        bs = self.blocks.block_size
        lens = [s.num_tokens for s in seqs]
        width = -(-max(lens) // bs)
        blocks = [b for s in seqs for b in s.block_table[:width] + [0] * (width - len(s.block_table[:width]))]
        pad = torch.arange(width * bs).unsqueeze(0) >= torch.tensor(lens).unsqueeze(1)      # (B, width * bs)
        mask = torch.zeros(pad.shape, dtype=self.dtype).masked_fill_(pad, float("-inf"))
        mask = mask.unsqueeze(0).expand(self.num_kv_heads, -1, -1).reshape(-1, 1, width * bs)  # (nkv * B, 1, ctx)
        attn.decode_blocks = torch.tensor(blocks, device=self.device)
        attn.decode_mask = mask.to(self.device)
        attn.block_size = bs

    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Forward the batch; returns float32 logits [num_seqs, vocab] for each sequence's last token."""
        input_ids, ctx, logit_rows = self.prepare(batch)
        logits = self.model(input_ids, ctx, logit_rows)
        for seq in batch.sequences:
            seq.num_computed_tokens = seq.num_tokens
        return logits
