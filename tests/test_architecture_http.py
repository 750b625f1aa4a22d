"""Each architecture family over real HTTP: `loramux serve --model DIR` on a random checkpoint of it
(Llama 3.x with its llama3 rope and biases, Qwen2 with a sliding window, Qwen3 with q/k norms,
Mistral with a window shorter than the prompts, Phi-3 with fused projections, partial rotary and
longrope, Gemma 3 text with sliding and global layers), a peft LoRA on all its linear layers
registered through the vLLM route, greedy answers from the `openai` client == transformers / peft; and
the one-line refusal of a checkpoint we cannot serve."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from tests.adapter_factory import load_peft_model, make_lora_adapter
from tests.arch_checkpoints import NEW_TOKENS, TEXTS, write_arch_checkpoint
from tests.hf_reference import hf_greedy
from tests.server_process import start_server


@pytest.fixture(scope="module", params=["llama3", "qwen2", "qwen3", "mistral", "phi3", "gemma3"])
def arch_server(request, base_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"{request.param}-http")
    path = write_arch_checkpoint(request.param, root / f"{request.param}-tiny", base_model_dir)
    adapter = make_lora_adapter(path, root / "adapters" / "lora", r=4, alpha=8, targets="all-linear",
                                init_lora_weights=False, seed=7, b_std=0.1)
    server = start_server(root, "--model", str(path), "--dtype", "float32", "--quantize", "none",
                          "--kv-cache-gb", "0.01", "--allowed-root", str(root / "adapters"))
    yield path, adapter, server
    server.stop()


def test_greedy_over_http_matches_transformers_and_peft(arch_server):
    from openai import OpenAI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, adapter, server = arch_server
    r = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "g", "lora_path": str(adapter)},
                   timeout=60)
    assert r.status_code == 200, r.text
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    peft_model = load_peft_model(path, adapter)
    client = OpenAI(base_url=f"{server.url}/v1", api_key="none")
    for model_name, oracle in ((path.name, base), ("g", peft_model)):
        for prompt in prompts:
            out = client.completions.create(model=model_name, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0,
                                            extra_body={"ignore_eos": True})
            want = tokenizer.decode(hf_greedy(oracle, prompt, NEW_TOKENS))
            assert out.choices[0].text == want, model_name


def test_unsupported_checkpoint_is_refused_in_one_line(tmp_path):
    """No traceback, one error line naming what is not supported, exit status 2."""
    model = tmp_path / "gemma2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"]}))
    (model / "model.safetensors").write_bytes(b"")
    proc = subprocess.run([sys.executable, "-m", "loramux", "serve", "--model", str(model), "--data-dir",
                           str(tmp_path / "data")], check=False, capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2, lines
    assert "Traceback" not in proc.stderr
    errors = [line for line in lines if " ERROR " in line]
    assert len(errors) == 1 and "architecture Gemma2ForCausalLM is not supported" in errors[0], lines
