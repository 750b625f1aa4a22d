"""Turns a scheduled batch into one flat forward pass: token ids, positions, KV rows, adapter slots.

The step's metadata is built once, from plain Python lists, into one tensor per field (nano-vllm's
way); every layer reuses it.
"""
from __future__ import annotations

from collections.abc import Callable

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
                 lora_stacks: LoraSlots | None = None, batch_invariant: bool = False) -> None:
        self.model = model
        self.batch_invariant = batch_invariant
        # Set by each run: (sequence, logits [n, vocab]) of the prompt positions it scored (prompt_logprobs).
        self.prompt_logits: list[tuple[Sequence, torch.Tensor]] = []
        self._prompt_spans: list[tuple[Sequence, int]] = []
        # Set by each run: the sequences whose new K/V was not finite (none of it was written).
        self.nonfinite: list[Sequence] = []
        self._row_owners: list[tuple[int, int, Sequence]] = []   # (first row, end row, sequence) of a step
        self.kv = kv
        self.blocks = blocks
        self.device = device
        self.lora_stacks = lora_stacks
        self.dtype = kv.k[0].dtype
        self.num_kv_heads = kv.k[0].shape[0]
        self.windows = model.spec.windows           # distinct sliding windows: one metadata each per step

    def _rows(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Cache rows of logical positions start..end-1 of `seq`."""
        bs, table = self.blocks.block_size, seq.block_table
        return [table[i // bs] * bs + i % bs for i in range(start, end)]

    def _stale_rows(self, seq: Sequence, first: int, end: int) -> list[int]:
        """Rows past `end` in the block of position end - 1, when this step writes that block's first
        row (positions first..end-1): whatever an earlier owner left there is cleared, so a masked
        row of a decode gather always holds zeros (engine.attention's docstring)."""
        bs = self.blocks.block_size
        b = (end - 1) // bs
        if first > b * bs or end % bs == 0:
            return []
        base = seq.block_table[b] * bs
        return list(range(base + end % bs, base + bs))

    def _write_prefix(self, seq: Sequence) -> None:
        """Put a prefix-tuning adapter's virtual-token KV (computed once, at registration) in the cache,
        at the sequence's first chunk. Rows of blocks found in the prefix cache are already there."""
        prefix = seq.lease.prefix_kv                                     # (L, 2, n_virt, nkv, hd)
        start, end = seq.num_computed_tokens, seq.num_prefix_tokens
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
        chunks: list[tuple[int, int, int, int, Sequence]] = []    # (first row, end row, start, end, seq)
        logit_rows: list[int] = []
        prompt_rows: list[int] = []
        stale: list[int] = []
        self._prompt_spans = []
        self._row_owners = []
        for seq, end in zip(batch.prefills, batch.chunk_ends):
            first = seq.num_computed_tokens
            if seq.num_computed_tokens < seq.num_prefix_tokens:
                self._write_prefix(seq)
            start = seq.num_computed_tokens
            stale += self._stale_rows(seq, first, end)
            row = len(ids)
            self._row_owners.append((row, row + end - start, seq))
            ids.extend(seq.token_at(i) for i in range(start, end))
            positions.extend(range(start, end))
            slot_mapping.extend(self._rows(seq, start, end))
            token_slots.extend([seq.lora_slot] * (end - start))
            chunks.append((row, len(ids), start, end, seq))
            if end == seq.num_tokens:                   # its prompt is done: this row gives its first token
                logit_rows.append(len(ids) - 1)
            scored = _prompt_positions(seq, start, end)
            if scored:
                prompt_rows.extend(row + q - start for q in scored)
                self._prompt_spans.append((seq, len(scored)))
        decode_start = len(ids)
        for seq in batch.decodes:
            n = seq.num_tokens
            stale += self._stale_rows(seq, n - 1, n)
            self._row_owners.append((len(ids), len(ids) + 1, seq))
            ids.append(seq.token_at(n - 1))
            positions.append(n - 1)
            slot_mapping.extend(self._rows(seq, n - 1, n))
            token_slots.append(seq.lora_slot)
            logit_rows.append(len(ids) - 1)
        slots = torch.tensor(slot_mapping, device=dev)
        clear = torch.tensor(stale, device=dev) if stale else None
        nonfinite: set[int] = set()                # shared by every metadata set: any layer's finding counts
        attn = self._metadata(slots, chunks, decode_start, batch.decodes, None, clear, nonfinite)
        windowed = {w: self._metadata(slots, chunks, decode_start, batch.decodes, w, clear, nonfinite)
                    for w in self.windows}
        lora = LoraStep.build(token_slots, self.lora_stacks, self.model.spec, dev, decode=not batch.prefills,
                              per_token=self.batch_invariant)
        ctx = ForwardContext(positions=torch.tensor(positions, device=dev), attn=attn, kv=self.kv, lora=lora,
                             windowed=windowed)
        logit_rows += prompt_rows                    # after every sampled sequence's row
        every = logit_rows == list(range(len(ids)))
        rows = None if every else torch.tensor(logit_rows, dtype=torch.long, device=dev)   # None: every row, in order
        return torch.tensor(ids, dtype=torch.long, device=dev), ctx, rows

    def _metadata(self, slot_mapping: torch.Tensor, chunks: list[tuple[int, int, int, int, Sequence]],
                  decode_start: int, decodes: list[Sequence], window: int | None, clear_rows: torch.Tensor | None,
                  nonfinite: set[int]) -> AttentionMetadata:
        """The step's attention metadata for full causal attention (window None) or for layers that
        see only the last `window` positions (transformers' sliding window: key j is visible from
        query i when i - window < j <= i). Every key stays in the cache; the window is a mask, exact."""
        dev, spans = self.device, []
        for row, row_end, start, end, seq in chunks:
            if start == 0 and (window is None or end <= window):
                spans.append(PrefillSpan(row, row_end, None, None))         # plain causal over its own tokens
                continue
            # attends to cached context too (earlier chunks, cached prefix, virtual tokens), or a window
            q_pos = torch.arange(start, end, device=dev).unsqueeze(1)                    # (q, 1)
            k_pos = torch.arange(end, device=dev).unsqueeze(0)                           # (1, ctx)
            mask = k_pos <= q_pos                                                        # (q, ctx)
            if window is not None:
                mask &= k_pos > q_pos - window
            spans.append(PrefillSpan(row, row_end, torch.tensor(self._rows(seq, 0, end), device=dev), mask))
        attn = AttentionMetadata(slot_mapping, spans, decode_start, None, None, clear_rows=clear_rows,
                                 nonfinite_rows=nonfinite, batch_invariant=self.batch_invariant, window=window)
        if decodes:
            self._decode_metadata(decodes, attn, window)
        return attn

    def _decode_metadata(self, seqs: list[Sequence], attn: AttentionMetadata, window: int | None) -> None:
        """The KV blocks of each decode sequence's whole context, padded to the longest, and the
        additive mask of every row that is not one of its tokens (or is out of its window), in the
        layout paged_attention's decode path reads."""
        bs = self.blocks.block_size
        lens = [s.num_tokens for s in seqs]
        width = -(-max(lens) // bs)
        null = self.kv.null_block          # all zeros, never written: padding adds exact zeros
        blocks = [b for s in seqs for b in s.block_table[:width] + [null] * (width - len(s.block_table[:width]))]
        k_pos, n = torch.arange(width * bs).unsqueeze(0), torch.tensor(lens).unsqueeze(1)
        pad = k_pos >= n                                                                      # (B, width * bs)
        if window is not None:
            pad |= k_pos <= n - 1 - window
        mask = torch.zeros(pad.shape, dtype=self.dtype).masked_fill_(pad, float("-inf"))
        mask = mask.unsqueeze(0).expand(self.num_kv_heads, -1, -1).reshape(-1, 1, width * bs)  # (nkv * B, 1, ctx)
        attn.decode_blocks = torch.tensor(blocks, device=self.device)
        attn.decode_mask = mask.to(self.device)
        attn.block_size = bs

    def run(self, batch: ScheduledBatch, should_yield: Callable[[], bool] | None = None) -> torch.Tensor:
        """Forward the batch; returns float32 logits [len(batch.sampled), vocab]: the last token of
        each sequence that gets a token from this step, in `batch.sampled` order. The prompt positions
        scored for prompt_logprobs are left in `self.prompt_logits`. `should_yield` is asked at the
        forward's checkpoints (ForwardContext.checkpoint): True raises StepYielded, nothing of the
        step counted as computed."""
        input_ids, ctx, logit_rows = self.prepare(batch)
        ctx.should_yield = should_yield
        logits = self.model(input_ids, ctx, logit_rows)
        bad = ctx.attn.nonfinite_rows
        self.nonfinite = [seq for start, end, seq in self._row_owners if bad and any(start <= r < end for r in bad)]
        for seq, end in zip(batch.prefills, batch.chunk_ends):
            seq.num_computed_tokens = end
        for seq in batch.decodes:
            seq.num_computed_tokens = seq.num_tokens
        num_sampled = len(batch.sampled)
        self.prompt_logits, at = [], num_sampled
        for seq, n in self._prompt_spans:
            self.prompt_logits.append((seq, logits[at:at + n]))
            at += n
        return logits[:num_sampled] if self._prompt_spans else logits


def _prompt_positions(seq: Sequence, start: int, end: int) -> list[int]:
    """Logical positions in [start, end) whose logits score a prompt token not scored yet (the one
    after each): a span of a prefill, so a prompt prefilled in chunks is scored chunk by chunk."""
    if seq.params.prompt_logprobs is None:
        return []
    first = seq.num_prefix_tokens + len(seq.prompt_logprobs)          # predicts prompt token len(...) + 1
    last = seq.num_prefix_tokens + len(seq.prompt_token_ids) - 1      # predicts the first output: not a prompt row
    return list(range(max(start, first), min(end, last)))
