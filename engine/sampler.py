"""Picks each sequence's next token from its logits: greedy, temperature, top-k, top-p, seeded."""
from __future__ import annotations

import torch

from loramux.engine.sampling_params import SamplingParams
from loramux.engine.sequence import TokenLogprob

# Dividing by a temperature near zero overflows float32 logits to inf and softmax to NaN, which
# multinomial refuses (and that would stop the engine thread); at 1e-4 sampling is all but greedy.
MIN_TEMPERATURE = 1e-4


def _filter(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One row [V] of float32 logits -> probabilities after temperature, top-k and top-p."""
    logits = logits / max(params.temperature, MIN_TEMPERATURE)
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest set whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
        drop[0] = False      # a top_p below float32's range compares as 0, which would drop them all
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        probs /= probs.sum()
    return probs


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int]:
    """logits: [B, V] float32 -> one token id per row."""
    tokens = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if not p.greedy:
            probs = _filter(logits[i], p)
            tokens[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    return tokens


def logprobs_of(logits: torch.Tensor, tokens: list[int], ks: list[int | None]) -> list[TokenLogprob | None]:
    """The chosen tokens' log-probabilities under the model (before sampling filters), plus top-k."""
    if all(k is None for k in ks):
        return [None] * len(tokens)
    logp = torch.log_softmax(logits, dim=-1)
    out: list[TokenLogprob | None] = []
    for i, (tok, k) in enumerate(zip(tokens, ks)):
        if k is None:
            out.append(None)
            continue
        top = torch.topk(logp[i], k) if k > 0 else None
        pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
        out.append(TokenLogprob(tok, float(logp[i, tok]), pairs))
    return out
