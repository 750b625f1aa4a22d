"""Greedy decoding with transformers as the oracle: no EOS handling, no logits processors."""
from __future__ import annotations

import torch


@torch.no_grad()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Token-by-token argmax with HF's own KV cache: what our engine must reproduce exactly."""
    out = model(torch.tensor([prompt_ids]), use_cache=True)
    past, tokens = out.past_key_values, []
    nxt = int(out.logits[0, -1].argmax())
    for _ in range(max_new_tokens):
        tokens.append(nxt)
        if len(tokens) == max_new_tokens:
            break
        out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
    return tokens


@torch.no_grad()
def hf_last_logits(model, prompt_ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([prompt_ids])).logits[0, -1].float()


@torch.no_grad()
def greedy_no_cache(model, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens by full re-forwarding each step (works for any PeftModel, prefix tuning included),
    plus the float32 logits of the prompt's last position."""
    ids = list(prompt_ids)
    first_logits = None
    for _ in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        if first_logits is None:
            first_logits = logits
        ids.append(int(logits.argmax()))
    return ids[len(prompt_ids):], first_logits
