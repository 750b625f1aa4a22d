"""echo, logprobs of the prompt, max_tokens 0 and vLLM's prompt_logprobs over real HTTP, checked
against transformers' log_softmax on the same weights (the session server runs in float32)."""
from __future__ import annotations

import httpx
import pytest
import torch

BASE = "SmolLM2-135M-Instruct"
TEXT = "Question: What is the capital of France?\nAnswer: Paris"


@pytest.fixture(scope="module")
def reference(hf_model_fp32, tokenizer):
    ids = tokenizer(TEXT)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(hf_model_fp32(torch.tensor([ids])).logits[0].float(), -1)
    return ids, [float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1)], logp


def test_echo_with_logprobs_scores_the_prompt(client, tokenizer, reference):
    ids, ref, _ = reference
    r = client.completions.create(model=BASE, prompt=[ids], echo=True, logprobs=1, max_tokens=1, temperature=0)
    choice = r.choices[0]
    lp = choice.logprobs
    assert choice.text.startswith(tokenizer.decode(ids)) and len(lp.tokens) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None          # nothing predicts the first token
    for got, want in zip(lp.token_logprobs[1:len(ids)], ref):
        assert abs(got - want) < 1e-3       # float32 logits agree within 1e-3 (summation order differs)
    for i in range(1, len(ids) + 1):        # the top token and the chosen one, as OpenAI and vLLM give them
        assert lp.tokens[i] in lp.top_logprobs[i] and max(lp.top_logprobs[i].values()) >= lp.token_logprobs[i]
    assert lp.text_offset[0] == 0 and lp.text_offset[-1] == sum(len(t) for t in lp.tokens[:-1])
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 1


def test_max_tokens_zero_with_echo_returns_the_prompt_alone(client, reference):
    ids, ref, _ = reference
    r = client.completions.create(model=BASE, prompt=TEXT, echo=True, logprobs=0, max_tokens=0)
    choice = r.choices[0]
    assert choice.text == TEXT and choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == len(ids) and r.usage.completion_tokens == 0
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(ref, abs=1e-3)
    plain = client.completions.create(model=BASE, prompt=TEXT, echo=True, max_tokens=3, temperature=0)
    alone = client.completions.create(model=BASE, prompt=TEXT, max_tokens=3, temperature=0)
    assert plain.choices[0].text == TEXT + alone.choices[0].text and plain.choices[0].logprobs is None


def test_streamed_echo_equals_whole(client):
    kw = dict(model=BASE, prompt=["The sky is", "Two plus two is"], echo=True, logprobs=2, max_tokens=4,
              temperature=0)
    whole = sorted(client.completions.create(**kw).choices, key=lambda c: c.index)
    texts, tokens = {}, {}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            tokens.setdefault(c.index, []).extend(c.logprobs.tokens if c.logprobs else [])
    assert [texts[c.index] for c in whole] == [c.text for c in whole]
    assert [tokens[c.index] for c in whole] == [c.logprobs.tokens for c in whole]


def test_vllm_prompt_logprobs(server, tokenizer, reference):
    ids, ref, logp = reference
    r = httpx.post(f"{server.url}/v1/completions", json={"model": BASE, "prompt": [ids], "max_tokens": 1,
                                                         "prompt_logprobs": 2}, timeout=120).json()
    prompt_lps = r["choices"][0]["prompt_logprobs"]
    assert prompt_lps[0] is None and len(prompt_lps) == len(ids)
    for i, entry in enumerate(prompt_lps[1:]):
        mine = entry[str(ids[i + 1])]
        assert abs(mine["logprob"] - ref[i]) < 1e-3
        assert mine["decoded_token"] == tokenizer.decode([ids[i + 1]])
        top = [t for t, e in entry.items() if e["rank"] in (1, 2)]
        assert sorted(int(t) for t in top) == sorted(torch.topk(logp[i], 2).indices.tolist())
    chat = httpx.post(f"{server.url}/v1/chat/completions", json={
        "model": BASE, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "prompt_logprobs": 0},
        timeout=120).json()
    assert chat["prompt_logprobs"][0] is None and all(len(e) == 1 for e in chat["prompt_logprobs"][1:])
