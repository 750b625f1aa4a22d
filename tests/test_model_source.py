"""Where base weights come from: the embedded GGUF converted once, or a local HF checkpoint."""
from __future__ import annotations

import json
import shutil

import pytest

from loramux.engine import model_source
from loramux.engine.model_source import ModelSourceError, check_model_dir, resolve_model


def test_embedded_model_is_converted_once_and_cached(base_model_dir, monkeypatch):
    assert (base_model_dir / "model.safetensors").is_file()
    assert (base_model_dir / "tokenizer.json").is_file()
    assert "quantization_config" not in json.loads((base_model_dir / "config.json").read_text())

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cached conversion should have been reused")
    monkeypatch.setattr(model_source, "convert_gguf", must_not_run)
    assert resolve_model(None) == base_model_dir


@pytest.mark.slow   # no rule of tests/conftest.py sees a conversion of the embedded model
def test_gguf_conversion_into_the_configured_cache(tmp_path, monkeypatch, base_model_dir):
    """The real dequantization (about 20 s) into $LORAMUX_CACHE gives the same weights as the cache."""
    from safetensors import safe_open

    monkeypatch.setenv("LORAMUX_CACHE", str(tmp_path))
    converted = resolve_model(None)
    assert converted.parent == tmp_path / "models"
    assert [p.name for p in converted.parent.iterdir()] == [converted.name]      # no leftover temp dirs
    with safe_open(str(converted / "model.safetensors"), "pt") as new, \
            safe_open(str(base_model_dir / "model.safetensors"), "pt") as old:
        assert set(new.keys()) == set(old.keys())
        key = "model.layers.3.mlp.down_proj.weight"
        assert new.get_tensor(key).equal(old.get_tensor(key))


def test_local_checkpoint_directory_is_accepted(base_model_dir, tmp_path):
    local = tmp_path / "my-llama"
    shutil.copytree(base_model_dir, local)
    assert resolve_model(str(local)) == local.resolve()
    assert model_source.model_name(local) == "my-llama"


@pytest.mark.parametrize("config, match", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "not supported"),
    ({"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"]}, "architecture Gemma2ForCausalLM is not"),
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
      "rope_parameters": {"rope_type": "proportional", "rope_theta": 1e4}}, "rope type 'proportional' is not"),
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "relu"}, "activation 'relu' is not"),
    ({"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "attn_logit_softcapping": 50.0},
     "attn_logit_softcapping=50.0 is not supported"),
])
def test_other_architectures_are_refused(tmp_path, config, match):
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelSourceError, match=match):
        check_model_dir(tmp_path)


def test_pickle_only_checkpoints_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelSourceError, match="safetensors"):
        check_model_dir(tmp_path)


def test_missing_directory_is_refused(tmp_path):
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_model(str(tmp_path / "nope"))
