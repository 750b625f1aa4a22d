"""Picks each sequence's next token from its logits, the whole batch at once.

Order (vLLM's): grammar mask -> logprobs reported (the model's, under the mask) -> penalties,
logit_bias, min_tokens -> greedy argmax, or temperature -> min_p -> top-k -> top-p -> a draw.
A batch of plain greedy rows (the common case, and the one compared with peft) is one argmax, as
before. A draw is one uniform per row against its cumulative distribution (on CPU, filling a
[B, vocab] tensor with random numbers, as multinomial and the exponential race do, costs ~60 ms
at batch 32): unseeded rows take theirs from the engine's generator in one call, a seeded request
from its own, so its tokens do not depend on what else is in the batch.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from loramux.engine.logits_processors import apply_logit_bias, apply_min_tokens, apply_penalties
from loramux.engine.sequence import Sequence, TokenLogprob
from loramux.engine.structured import GrammarMasks

# Dividing by a temperature near zero overflows float32 logits to inf and softmax to NaN, which
# would pick garbage; at 1e-4 sampling is all but greedy.
MIN_TEMPERATURE = 1e-4
CANDIDATES = 64               # top-p looks for its set among this many most likely tokens first
BLOCK = 256                   # tokens per block of the two-level cumulative sum of a draw


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: set[int]) -> None:
        self.vocab_size, self.eos_token_ids = vocab_size, eos_token_ids
        self.generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        self._masks: GrammarMasks | None = None

    @torch.inference_mode()          # the logits are the model's inference tensors, changed in place here
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits: [B, V] float32 (changed in place) -> one token per row, and its logprob entry."""
        params = [s.params for s in seqs]
        if all(p.greedy and not p.shapes_logits and p.logprobs is None and s.matcher is None
               for p, s in zip(params, seqs)):
            return logits.argmax(dim=-1).tolist(), [None] * len(seqs)
        structured = [i for i, s in enumerate(seqs) if s.matcher is not None]
        if structured:
            if self._masks is None:
                self._masks = GrammarMasks(logits.shape[1])
            self._masks.apply(logits, structured, [seqs[i].matcher for i in structured])
        wants_logprobs = [i for i, p in enumerate(params) if p.logprobs is not None]
        logp = torch.log_softmax(_rows(logits, wants_logprobs), dim=-1) if wants_logprobs else None
        self._shape(logits, seqs)
        drawn = [i for i, p in enumerate(params) if not p.greedy]
        if len(drawn) == len(seqs):
            tokens = self._draw(logits, seqs)             # in place: nothing else reads the logits now
        else:
            tokens = logits.argmax(dim=-1)
            if drawn:
                tokens[drawn] = self._draw(logits[drawn], [seqs[i] for i in drawn])
        token_list = tokens.tolist()
        out: list[TokenLogprob | None] = [None] * len(seqs)
        if logp is not None:
            chosen = [token_list[i] for i in wants_logprobs]
            for j, entry in enumerate(token_logprobs(logp, chosen, [params[i].logprobs for i in wants_logprobs])):
                out[wants_logprobs[j]] = entry
        return token_list, out

    def _shape(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """Penalties, logit_bias and min_tokens, each over the rows that ask for it."""
        pen = [i for i, s in enumerate(seqs) if s.params.has_penalties]
        if pen:
            apply_penalties(logits, pen, [seqs[i] for i in pen])
        bias = [i for i, s in enumerate(seqs) if s.params.logit_bias]
        if bias:
            apply_logit_bias(logits, bias, [seqs[i] for i in bias])
        # A grammar decides where its output ends: min_tokens would fight it (and could mask every token).
        short = [i for i, s in enumerate(seqs) if len(s.output_token_ids) < s.params.min_tokens and s.matcher is None]
        if short:
            apply_min_tokens(logits, short, [self._stop_ids(seqs[i]) for i in short])

    def _stop_ids(self, seq: Sequence) -> list[int]:
        eos = [] if seq.params.ignore_eos else sorted(self.eos_token_ids)
        return sorted(set(eos) | set(seq.params.stop_token_ids))

    def _draw(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Rows to sample from (changed in place): temperature, min_p, top-k, top-p, each as per-row
        values over the whole block (off = a neutral value), then one uniform per row against the
        row's cumulative distribution. Probabilities stay unnormalised (the top one is 1)."""
        params = [s.params for s in seqs]
        probs = logits.div_(torch.tensor([max(p.temperature, MIN_TEMPERATURE) for p in params]).unsqueeze(1))
        probs.sub_(probs.amax(dim=-1, keepdim=True)).exp_()
        if any(p.min_p > 0.0 for p in params):
            probs.masked_fill_(probs < torch.tensor([p.min_p for p in params]).unsqueeze(1), 0.0)
        top_k, top_p = any(p.top_k > 0 for p in params), any(p.top_p < 1.0 for p in params)
        if top_k or top_p:         # one partial sort serves both: the top max(k, CANDIDATES) of each row
            ks = torch.tensor([min(p.top_k, probs.shape[1]) for p in params])
            width = min(max(int(ks.max()), CANDIDATES if top_p else 0), probs.shape[1])
            values = torch.topk(probs, width, dim=-1).values
            if top_k:
                kth = values.gather(1, (ks - 1).clamp(min=0).unsqueeze(1)).masked_fill_(ks.unsqueeze(1) == 0, 0.0)
                probs.masked_fill_(probs < kth, 0.0)
                values.masked_fill_(values < kth, 0.0)
            if top_p:
                threshold = _top_p_threshold(probs, values, torch.tensor([p.top_p for p in params]))
                probs.masked_fill_(probs < threshold, 0.0)
        u = torch.rand(len(seqs), generator=self.generator)
        for i, s in enumerate(seqs):
            if s.generator is not None:
                u[i] = torch.rand(1, generator=s.generator)
        return _inverse_cdf(probs, u)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token where each row's cumulative mass passes u * its total (probabilities unnormalised).

    In two levels, blocks of BLOCK tokens then the chosen block: torch's CPU cumsum over a whole
    [32, 49152] block takes ~6 ms, sums and a cumsum over 192 block sums well under one.
    """
    rows, vocab = probs.shape
    padded = torch.nn.functional.pad(probs, (0, -vocab % BLOCK)).view(rows, -1, BLOCK)
    sums = padded.sum(dim=-1)
    cum = sums.cumsum(dim=-1)
    target = (u * cum[:, -1]).unsqueeze(1)
    block = torch.searchsorted(cum, target, right=True).clamp_(max=cum.shape[1] - 1)
    before = cum.gather(1, block) - sums.gather(1, block)
    inner = padded[torch.arange(rows), block.squeeze(1)].cumsum(dim=-1) + before
    tokens = block * BLOCK + torch.searchsorted(inner, target, right=True).clamp_(max=BLOCK - 1)
    tokens = tokens.clamp_(max=vocab - 1)
    # Float rounding at a block edge can land on a zero-probability token: take the likeliest instead.
    zero = probs.gather(1, tokens) == 0
    if bool(zero.any()):
        tokens = torch.where(zero, probs.argmax(dim=-1, keepdim=True), tokens)
    return tokens.squeeze(1)


def _rows(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """t[rows] (a copy), or t itself when that is every row."""
    return t if len(rows) == t.shape[0] else t[rows]


def _top_p_threshold(probs: torch.Tensor, values: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per row, the smallest probability in its smallest set of most likely tokens whose mass reaches
    top_p (of what is left); 0 for rows with top_p 1. Found among `values` (each row's top tokens,
    sorted); a row whose set is larger sorts its whole vocabulary, with numpy (torch's CPU sort of
    32 x 49152 floats takes ~180 ms, numpy's ~65 ms)."""
    need = probs.sum(dim=-1) * top_p
    inside = values.cumsum(dim=-1) - values < need.unsqueeze(1)      # tokens before it hold less than top_p
    inside[:, 0] = True          # a top_p below float32's range compares as 0, which would drop them all
    threshold = values.gather(1, inside.sum(dim=-1, keepdim=True) - 1)
    wide = (inside[:, -1] & (top_p < 1.0)).nonzero().flatten().tolist() if values.shape[1] < probs.shape[1] else []
    if wide:
        full = torch.from_numpy(np.ascontiguousarray(np.sort(probs[wide].numpy(), axis=-1)[:, ::-1]))
        keep = full.cumsum(dim=-1) - full < need[wide].unsqueeze(1)
        keep[:, 0] = True
        threshold[wide] = full.gather(1, keep.sum(dim=-1, keepdim=True) - 1)
    return threshold.masked_fill_((top_p >= 1.0).unsqueeze(1), 0.0)


def token_logprobs(logp: torch.Tensor, tokens: list[int], ks: list[int], ranks: bool = False) -> list[TokenLogprob]:
    """Rows of log-probabilities -> each row's `tokens[i]` entry with its top `ks[i]` alternatives
    (and, with `ranks`, the token's rank: 1 + the number of more likely tokens)."""
    index = torch.tensor(tokens).unsqueeze(1)
    chosen = logp.gather(1, index).squeeze(1)
    kmax = max(ks)
    top = torch.topk(logp, kmax, dim=-1) if kmax else None
    rank = ((logp > chosen.unsqueeze(1)).sum(dim=-1) + 1).tolist() if ranks else [None] * len(tokens)
    top_ids = top.indices.tolist() if top is not None else [[]] * len(tokens)
    top_values = top.values.tolist() if top is not None else [[]] * len(tokens)
    return [TokenLogprob(tok, lp, list(zip(ids[:k], values[:k])), r)
            for tok, lp, ids, values, k, r in zip(tokens, chosen.tolist(), top_ids, top_values, ks, rank)]


@torch.inference_mode()
def score_prompt(seq: Sequence, logits: torch.Tensor, rows_at_once: int = 256) -> None:
    """Append to `seq.prompt_logprobs` the entries of the prompt tokens these logits (of consecutive
    positions, the next ones not scored yet) predict, with their ranks and top prompt_logprobs."""
    k = seq.params.prompt_logprobs or 0
    for at in range(0, logits.shape[0], rows_at_once):       # bounds the log_softmax copy of a long prompt
        first = len(seq.prompt_logprobs) + 1
        block = logits[at:at + rows_at_once]
        targets = seq.prompt_token_ids[first:first + block.shape[0]]
        seq.prompt_logprobs.extend(token_logprobs(torch.log_softmax(block, dim=-1), targets, [k] * len(targets),
                                                  ranks=True))
