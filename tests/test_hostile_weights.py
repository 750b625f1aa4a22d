"""Weights that overflow are refused, over a real socket (issue #28, items 2 and 3).

A real `loramux serve` with the issue's `--kv-cache-gb 0.02` (blocks reused all the time), float32,
admin key. Today's main accepted a mixture weight of 1e74 (200), after which other clients' base
requests came back truncated or NaN, and registered adapters with `lora_alpha: 1e308` or weights
x 1e30 (201). Now each is a 400 naming its parameter, and a base client's greedy answer (with
logprobs) is the same before and after.
"""
from __future__ import annotations

import json
import math

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from loramux.engine.models.spec import ModelSpec
from tests.adapter_factory import write_small_lora
from tests.server_process import ADMIN_KEY

BASE = "SmolLM2-135M-Instruct"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def srv(serve):
    return serve("--dtype", "float32", "--kv-cache-gb", "0.02", "--max-num-seqs", "4", "--max-loras", "2",
                 "--max-lora-rank", "8", "--admin-key", ADMIN_KEY)


def _base_answer(srv) -> dict:
    r = httpx.post(f"{srv.url}/v1/completions", timeout=300, json={
        "model": BASE, "prompt": "The quick brown fox", "max_tokens": 40, "temperature": 0, "ignore_eos": True,
        "logprobs": 1})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert all(math.isfinite(x) for x in choice["logprobs"]["token_logprobs"])
    return {"text": choice["text"], "finish": choice["finish_reason"]}


def _register(srv, adapter_id: str, folder) -> httpx.Response:
    return httpx.post(f"{srv.url}/v1/adapters", json={"id": adapter_id, "path": str(folder)}, headers=AUTH,
                      timeout=120)


def test_overflowing_weights_are_refused_and_change_no_answer(srv, base_model_dir):
    spec = ModelSpec.from_dir(base_model_dir)
    before = _base_answer(srv)
    assert _register(srv, "wsrc", write_small_lora(srv.adapters_root / "wsrc", spec, seed=5)).status_code == 201
    try:
        for mixture, param in (({"adapters": [{"id": "wsrc", "weight": 1e74}]}, "adapters.0.weight"),
                               ({"adapters": [{"id": "wsrc", "weight": 1}, {"id": BASE, "weight": -1e5}]},
                                "adapters.1.weight"),
                               ({"adapters": [{"id": "wsrc", "weight": 1}, {"id": "wsrc2", "weight": 1}],
                                 "merge": "dare_linear", "density": 1e-300}, "density")):
            r = httpx.post(f"{srv.url}/v1/completions", timeout=120, json={
                "model": BASE, "prompt": "Hi", "max_tokens": 8, "temperature": 0, **mixture})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == param, r.text

        big_alpha = write_small_lora(srv.adapters_root / "alpha", spec, seed=6)
        config = json.loads((big_alpha / "adapter_config.json").read_text())
        (big_alpha / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 1e308}))
        big_weights = write_small_lora(srv.adapters_root / "x1e30", spec, seed=7)
        tensors = load_file(str(big_weights / "adapter_model.safetensors"))
        save_file({k: (v * 1e30 if "lora_B" in k else v).contiguous() for k, v in tensors.items()},
                  str(big_weights / "adapter_model.safetensors"))
        assert all(bool(torch.isfinite(v).all()) for v in load_file(str(big_weights / "adapter_model.safetensors"))
                   .values())
        for name, folder in (("alpha", big_alpha), ("x1e30", big_weights)):
            r = _register(srv, name, folder)
            assert r.status_code == 400, r.text
            assert "without overflow" in r.json()["error"]["message"], r.text
            assert httpx.get(f"{srv.url}/v1/adapters/{name}", headers=AUTH, timeout=30).status_code == 404
        assert _base_answer(srv) == before
    finally:
        assert httpx.delete(f"{srv.url}/v1/adapters/wsrc", headers=AUTH, timeout=60).status_code == 200
