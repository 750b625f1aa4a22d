"""End to end: a real server process over a real socket, driven by the official openai client."""
from __future__ import annotations

import concurrent.futures as cf

import httpx
import openai
import pytest

BASE = "SmolLM2-135M-Instruct"


def test_models_and_health(server, client):
    ids = [m.id for m in client.models.list().data]
    assert BASE in ids
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_completion(client):
    r = client.completions.create(model=BASE, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert "Paris" in r.choices[0].text
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason == "length"


def test_chat(client):
    r = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "What is the capital of France?"}],
                                       max_tokens=30, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop"            # the model ends its turn with <|im_end|>


def test_streaming_equals_non_streaming(client):
    kw = dict(model=BASE, messages=[{"role": "user", "content": "Name two fruits."}], max_tokens=24, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1


def test_completion_stream(client):
    whole = client.completions.create(model=BASE, prompt="def add(a, b):", max_tokens=20, temperature=0).choices[0].text
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=BASE, prompt="def add(a, b):", max_tokens=20, temperature=0, stream=True))
    assert text == whole


def test_stop_string(client):
    full = client.completions.create(model=BASE, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0).choices[0].text
    stop = full.strip()[3:5]
    r = client.completions.create(model=BASE, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[:full.find(stop)]


def test_n_choices_and_concurrent_requests(client):
    r = client.completions.create(model=BASE, prompt="My favourite animal is", max_tokens=6, n=3, temperature=1.0,
                                  seed=1)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == sum(6 if c.finish_reason == "length" else 1 for c in r.choices) or \
        r.usage.completion_tokens <= 18
    prompts = [f"Count to {k}:" for k in range(3, 9)]

    def one(p):
        return client.completions.create(model=BASE, prompt=p, max_tokens=10, temperature=0).choices[0].text
    alone = [one(p) for p in prompts]
    with cf.ThreadPoolExecutor(6) as ex:
        together = list(ex.map(one, prompts))
    assert together == alone


def test_logprobs(client):
    r = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert content[0].top_logprobs[0].logprob == pytest.approx(content[0].logprob, abs=1e-4)


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-adapter", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"


def test_negative_max_tokens_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=BASE, prompt="x", max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"


def test_prompt_over_context_window_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=BASE, prompt="hello " * 600, max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded"
    assert "maximum context length is 512" in e.value.body["message"]


@pytest.mark.parametrize("body", [
    {"model": BASE, "prompt": "x", "temperature": 5},
    {"model": BASE, "prompt": "x", "top_p": 0},
    {"model": BASE, "prompt": "x", "n": 0},
    {"model": BASE, "prompt": []},
    {"model": BASE},
    {"model": BASE, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]},
])
def test_bad_parameters_are_400_in_openai_shape(server, body):
    r = httpx.post(f"{server.url}/v1/completions", json=body)
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_metrics_exposed(server, client):
    client.completions.create(model=BASE, prompt="Hello", max_tokens=2)
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("loramux_requests_total", "loramux_generation_tokens_total", "loramux_time_to_first_token_seconds",
                 "loramux_time_per_output_token_seconds", "loramux_queue_depth", "loramux_batch_size",
                 "loramux_memory_bytes"):
        assert name in text, name
