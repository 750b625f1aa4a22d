"""Picks each sequence's next token from its logits, the whole batch at once.

Order (vLLM's): grammar mask -> logprobs reported (the model's, under the mask) -> penalties,
logit_bias, min_tokens -> greedy argmax, or temperature -> min_p -> top-k -> top-p -> a draw.
A batch of plain greedy rows (the common case, and the one compared with peft) is one argmax, as
before. Draws use the exponential race (argmax of p / q, q ~ Exp(1)): one batched fill of q from
the engine's generator, and a seeded request's row refilled from its own generator, so its tokens
do not depend on what else is in the batch.
"""
from __future__ import annotations

import os

import torch

from loramux.engine.logits_processors import apply_logit_bias, apply_min_tokens, apply_penalties
from loramux.engine.sequence import Sequence, TokenLogprob
from loramux.engine.structured import GrammarMasks

# Dividing by a temperature near zero overflows float32 logits to inf and softmax to NaN, which
# would pick garbage; at 1e-4 sampling is all but greedy.
MIN_TEMPERATURE = 1e-4


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
        logp = torch.log_softmax(logits[wants_logprobs], dim=-1) if wants_logprobs else None
        self._shape(logits, seqs)
        tokens = logits.argmax(dim=-1)
        drawn = [i for i, p in enumerate(params) if not p.greedy]
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
        """Rows to sample from: temperature, min_p, top-k, top-p, then the exponential race."""
        params = [s.params for s in seqs]
        logits = logits / torch.tensor([max(p.temperature, MIN_TEMPERATURE) for p in params]).unsqueeze(1)
        if any(p.min_p > 0.0 for p in params):
            probs = torch.softmax(logits, dim=-1)
            floor = probs.amax(dim=-1, keepdim=True) * torch.tensor([p.min_p for p in params]).unsqueeze(1)
            logits.masked_fill_(probs < floor, float("-inf"))
        top_k = [i for i, p in enumerate(params) if p.top_k > 0]
        if top_k:
            ks = torch.tensor([min(params[i].top_k, logits.shape[1]) for i in top_k])
            values = torch.topk(logits[top_k], int(ks.max()), dim=-1).values
            kth = values.gather(1, (ks - 1).unsqueeze(1))
            logits[top_k] = logits[top_k].masked_fill_(logits[top_k] < kth, float("-inf"))
        top_p = [i for i, p in enumerate(params) if p.top_p < 1.0]
        if top_p:
            logits[top_p] = _top_p(logits[top_p], torch.tensor([params[i].top_p for i in top_p]))
        probs = torch.softmax(logits, dim=-1)
        q = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, s in enumerate(seqs):
            if s.generator is not None:
                q[i].exponential_(generator=s.generator)
        # q == 0 would make a zero-probability token win (0 / 0 is NaN, which argmax picks).
        return (probs / q.clamp_(min=torch.finfo(q.dtype).tiny)).argmax(dim=-1)


def _top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep each row's smallest set of most likely tokens whose mass reaches its top_p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    drop = probs.cumsum(dim=-1) - probs >= top_p.unsqueeze(1)
    drop[:, 0] = False       # a top_p below float32's range compares as 0, which would drop them all
    return logits.scatter(1, order, sorted_logits.masked_fill_(drop, float("-inf")))


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
