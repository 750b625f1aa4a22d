"""What a request does to its row of logits before sampling: repetition, frequency and presence
penalties, logit_bias, min_tokens. Vectorised over the batch: each is one sparse op on the flat
logits over (row, token) keys, so the cost grows with the tokens involved, not with rows x vocab.

Semantics follow vLLM (and, for repetition_penalty, transformers' RepetitionPenaltyLogitsProcessor):
repetition first, over prompt and generated tokens (a positive logit divided by the penalty, a
negative one multiplied); then frequency (times each generated token's count) and presence (once
per generated token) subtracted, as OpenAI documents them.
"""
from __future__ import annotations

import itertools

import torch

from loramux.engine.sequence import Sequence


def _keys(rows: list[int], token_lists: list[list[int]], vocab: int) -> torch.Tensor:
    """Flat indices row * vocab + token of each row's tokens, in one tensor."""
    tokens = torch.tensor(list(itertools.chain.from_iterable(token_lists)), dtype=torch.long)
    counts = torch.tensor([len(t) for t in token_lists])
    return torch.repeat_interleave(torch.tensor(rows, dtype=torch.long) * vocab, counts) + tokens


def _prompt_set(seq: Sequence) -> torch.Tensor:
    """The prompt's distinct token ids, computed once per sequence."""
    if seq.prompt_token_set is None:
        seq.prompt_token_set = torch.unique(torch.tensor(seq.prompt_token_ids, dtype=torch.long))
    return seq.prompt_token_set


def apply_penalties(logits: torch.Tensor, rows: list[int], seqs: list[Sequence]) -> None:
    """In place, on `logits[rows]` (rows of the sequences `seqs`, whose params have penalties)."""
    vocab = logits.shape[1]
    flat = logits.view(-1)
    rep = [(r, s) for r, s in zip(rows, seqs) if s.params.repetition_penalty != 1.0]
    if rep:
        prompt = torch.cat([_prompt_set(s) + r * vocab for r, s in rep])
        keys = torch.unique(torch.cat([prompt, _keys([r for r, _ in rep], [s.output_token_ids for _, s in rep],
                                                     vocab)]))
        penalty = torch.zeros(logits.shape[0])
        penalty[[r for r, _ in rep]] = torch.tensor([s.params.repetition_penalty for _, s in rep])
        p = penalty[keys // vocab]
        values = flat[keys]
        flat[keys] = torch.where(values > 0, values / p, values * p)
    add = [(r, s) for r, s in zip(rows, seqs) if s.output_token_ids and
           (s.params.frequency_penalty != 0.0 or s.params.presence_penalty != 0.0)]
    if add:
        keys, counts = torch.unique(_keys([r for r, _ in add], [s.output_token_ids for _, s in add], vocab),
                                    return_counts=True)
        freq, pres = torch.zeros(logits.shape[0]), torch.zeros(logits.shape[0])
        index = [r for r, _ in add]
        freq[index] = torch.tensor([s.params.frequency_penalty for _, s in add])
        pres[index] = torch.tensor([s.params.presence_penalty for _, s in add])
        row = keys // vocab
        flat[keys] -= freq[row] * counts + pres[row]


def apply_logit_bias(logits: torch.Tensor, rows: list[int], seqs: list[Sequence]) -> None:
    vocab = logits.shape[1]
    keys = _keys(rows, [list(s.params.logit_bias) for s in seqs], vocab)
    bias = torch.tensor(list(itertools.chain.from_iterable(s.params.logit_bias.values() for s in seqs)),
                        dtype=logits.dtype)
    logits.view(-1).index_add_(0, keys, bias)


def apply_min_tokens(logits: torch.Tensor, rows: list[int], stop_ids: list[list[int]]) -> None:
    """Mask each row's stop tokens (EOS and stop_token_ids): it has not reached min_tokens yet."""
    logits.view(-1)[_keys(rows, stop_ids, logits.shape[1])] = float("-inf")
