"""The full sampling set over real HTTP: every option per request in one mixed batch (base model,
an adapter, a per-request mixture), each row answering as it does alone; penalties, logit_bias,
min_tokens, stop_token_ids, include_stop_str_in_output as specified; bad values refused."""
from __future__ import annotations

import concurrent.futures as cf

import httpx
import pytest

from loramux.engine.models.spec import ModelSpec
from tests.adapter_factory import write_small_lora

BASE = "SmolLM2-135M-Instruct"
PROMPT = "List some fruits: apple, banana,"


@pytest.fixture(scope="module")
def adapter(server, base_model_dir, tmp_path_factory):
    path = write_small_lora(tmp_path_factory.mktemp("sampling") / "s-lora", ModelSpec.from_dir(base_model_dir), seed=5)
    r = httpx.post(f"{server.url}/v1/adapters", json={"id": "s-lora", "path": str(path)}, timeout=120)
    assert r.status_code == 201, r.text
    yield "s-lora"
    httpx.delete(f"{server.url}/v1/adapters/s-lora", timeout=120)


def _post(url: str, body: dict) -> dict:
    r = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, **body}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_mixed_batch_rows_answer_as_alone(server, adapter):
    """Seven requests with different options (and grammars, adapters, a mixture) run together in one
    batch; each gets the answer it gets alone: no option leaks into another row."""
    bodies = [
        {"model": BASE, "temperature": 0},
        {"model": adapter, "temperature": 0, "guided_json": {"type": "object", "properties": {
            "fruit": {"type": "string"}}, "required": ["fruit"]}},
        {"model": BASE, "adapters": [{"id": adapter, "weight": 0.5}], "temperature": 0, "guided_regex": "[a-z]+(, [a-z]+)*"},
        {"model": BASE, "temperature": 0, "frequency_penalty": 1.5, "presence_penalty": 0.5},
        {"model": BASE, "temperature": 0, "repetition_penalty": 1.4, "logit_bias": {"29": 4.0}},
        {"model": adapter, "temperature": 0, "min_tokens": 6, "stop_token_ids": [30]},
        {"model": BASE, "temperature": 0.9, "seed": 11, "top_p": 0.9, "top_k": 40, "min_p": 0.05},
    ]
    alone = [_post(server.url, b) for b in bodies]
    with cf.ThreadPoolExecutor(len(bodies)) as ex:
        together = list(ex.map(lambda b: _post(server.url, b), bodies))
    assert [c["text"] for c in together] == [c["text"] for c in alone]
    assert len({c["text"] for c in alone}) > 4                 # the options really differ in what they do


def test_penalties_break_repetition(server):
    plain = _post(server.url, {"model": BASE, "prompt": "1 1 1 1 1 1 1 1", "temperature": 0, "max_tokens": 16})
    penalized = _post(server.url, {"model": BASE, "prompt": "1 1 1 1 1 1 1 1", "temperature": 0, "max_tokens": 16,
                                   "frequency_penalty": 2.0, "presence_penalty": 2.0})
    assert len(set(penalized["text"].split())) > len(set(plain["text"].split()))


def test_logit_bias_min_tokens_and_stop_token_ids(server, tokenizer):
    forced = tokenizer.encode(" kiwi", add_special_tokens=False)[0]
    body = {"model": BASE, "temperature": 0, "logit_bias": {str(forced): 100}}
    assert _post(server.url, {**body, "max_tokens": 3})["text"] == tokenizer.decode([forced] * 3)
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": PROMPT, **body, "max_tokens": 10,
                                                          "stop_token_ids": [forced], "min_tokens": 3}, timeout=300)
    choice, usage = r.json()["choices"][0], r.json()["usage"]
    # the forced token is masked for 3 tokens, then chosen, and stops (kept in the text: not special)
    assert choice["finish_reason"] == "stop" and usage["completion_tokens"] == 4
    assert choice["text"].endswith(tokenizer.decode([forced])) and choice["text"].count("kiwi") == 1


def test_stop_string_kept_with_include_stop_str_in_output(server):
    full = _post(server.url, {"model": BASE, "temperature": 0, "max_tokens": 20})["text"]
    stop = full.strip()[3:6]
    cut = _post(server.url, {"model": BASE, "temperature": 0, "max_tokens": 20, "stop": [stop]})
    kept = _post(server.url, {"model": BASE, "temperature": 0, "max_tokens": 20, "stop": [stop],
                              "include_stop_str_in_output": True})
    assert kept["text"] == cut["text"] + stop and kept["finish_reason"] == "stop"


@pytest.mark.parametrize("extra, param", [
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"49152": 1}}, "logit_bias"),
    ({"stop_token_ids": [10**6]}, "stop_token_ids"),
    ({"min_tokens": 20, "max_tokens": 4}, "min_tokens"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": True}, "frequency_penalty"),
    ({"min_p": 1.5}, "min_p"),
    ({"max_tokens": 0}, "max_tokens"),                  # 0 only with echo
])
def test_bad_sampling_values_are_400(server, extra, param):
    r = httpx.post(f"{server.url}/v1/completions", json={"model": BASE, "prompt": "x", **extra}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_value" and err["param"] == param, err
