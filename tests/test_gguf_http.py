"""`loramux serve --model FILE.gguf` over a real socket: a tiny Q4_K_M-like Llama GGUF (tests/tiny_gguf.py)
served in float32: its greedy completion == transformers loading the same file; chat completions
use the chat template from the file's metadata (compared in tests/test_gguf_model.py)."""
from __future__ import annotations

import pytest
import torch

from tests.hf_reference import hf_greedy
from tests.tiny_gguf import tiny_gguf_files

PROMPT = "The capital of France is"
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def gguf_path():
    return tiny_gguf_files()["q4_k_m"]


@pytest.fixture(scope="module")
def gguf_server(serve, gguf_path):
    return serve("--model", str(gguf_path), "--dtype", "float32", "--max-model-len", "128", "--kv-cache-gb", "0.05")


def test_a_gguf_file_served_over_http_is_transformers_greedy(gguf_server, gguf_path, tokenizer):
    import httpx
    from openai import OpenAI
    from transformers import AutoModelForCausalLM

    client = OpenAI(base_url=f"{gguf_server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    assert gguf_path.stem in {m.id for m in client.models.list().data}
    out = client.completions.create(model=gguf_path.stem, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0,
                                    extra_body={"ignore_eos": True})
    hf = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    expected = hf_greedy(hf, tokenizer(PROMPT)["input_ids"], NEW_TOKENS)
    assert out.choices[0].text == tokenizer.decode(expected)
    chat = httpx.post(f"{gguf_server.url}/v1/chat/completions", timeout=120, json={
        "model": gguf_path.stem, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0})
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["completion_tokens"] >= 1
