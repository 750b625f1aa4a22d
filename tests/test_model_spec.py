"""ModelSpec read off config.json as published checkpoints write it (older `rope_scaling` keys, Phi-3's
top-level original_max_position_embeddings, Qwen2.5's unused sliding_window): rotary tables equal
to the ones transformers' own rotary module holds, windows and context caps as transformers applies them."""
from __future__ import annotations

import pytest
import torch

from loramux.engine.models.spec import ModelSpec

_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=32064)
LLAMA_31 = dict(_SMALL, model_type="llama", architectures=["LlamaForCausalLM"], max_position_embeddings=131072,
                rope_theta=500000.0, rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 8192, "rope_type": "llama3"})
PHI_35 = dict(_SMALL, model_type="phi3", architectures=["Phi3ForCausalLM"], num_key_value_heads=4, pad_token_id=32000,
              max_position_embeddings=131072, original_max_position_embeddings=4096, rope_theta=10000.0,
              rope_scaling={"type": "longrope", "long_factor": [1.5 + i / 8 for i in range(8)],
                            "short_factor": [1.0 + i / 16 for i in range(8)]}, sliding_window=262144)
QWEN_25 = dict(_SMALL, model_type="qwen2", architectures=["Qwen2ForCausalLM"], max_position_embeddings=32768,
               rope_theta=1000000.0, sliding_window=131072, use_sliding_window=False, max_window_layers=1)
GEMMA_3 = dict(_SMALL, model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], head_dim=16,
               sliding_window=512, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=256,
               rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})


def _hf_rotary(config: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**config)).model.rotary_emb


@pytest.mark.parametrize("config, context", [(LLAMA_31, 131072), (PHI_35, 4096), (QWEN_25, 32768)])
def test_rope_tables_are_transformers_own(config, context):
    spec = ModelSpec.from_config(config)
    rotary = _hf_rotary(config)
    [rope] = spec.ropes
    assert torch.equal(torch.tensor(rope.inv_freq), rotary.inv_freq)
    assert rope.attention_scaling == rotary.attention_scaling
    assert spec.max_position_embeddings == context          # longrope: its short factors' range only


def test_windows_follow_transformers_rules():
    assert ModelSpec.from_config(QWEN_25).layer_window == (None, None)            # use_sliding_window false
    assert ModelSpec.from_config(PHI_35).layer_window == (262144, 262144)
    assert ModelSpec.from_config(dict(QWEN_25, use_sliding_window=True)).layer_window == (None, 131072)


def test_gemma3_layers_have_their_own_rope_and_window():
    spec = ModelSpec.from_config(GEMMA_3)
    rotary = _hf_rotary(GEMMA_3)
    assert spec.layer_window == (512, None)
    for layer, kind in enumerate(GEMMA_3["layer_types"]):
        rope = spec.ropes[spec.layer_rope[layer]]
        assert torch.equal(torch.tensor(rope.inv_freq), getattr(rotary, f"{kind}_inv_freq"))
    assert spec.attn_scale == 256 ** -0.5 and spec.embed_scale == 64 ** 0.5 and spec.norm_offset == 1.0
