"""Shared fixtures: the real embedded base model, converted once per machine and cached."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as an HF safetensors directory."""
    from loramux.engine.model_source import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def hf_model_fp32(base_model_dir):
    """transformers' LlamaForCausalLM on the same weights: our oracle (float32, eval)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer(base_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model_dir)


@pytest.fixture(scope="session")
def server(tmp_path_factory, base_model_dir):
    """One real `loramux serve` process (float32, so greedy answers are exact) for the session."""
    from tests.server_process import start_server

    tmp = tmp_path_factory.mktemp("server")
    (tmp / "adapters").mkdir()
    proc = start_server(tmp, "--dtype", "float32", "--max-model-len", "512", "--kv-cache-gb", "0.25",
                        "--allowed-root", str(tmp / "adapters"), "--allowed-root", str(tmp_path_factory.getbasetemp()))
    proc.adapters_root = tmp / "adapters"
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
