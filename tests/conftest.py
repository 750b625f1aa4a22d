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
    from engine.model_source import resolve_model

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
