"""`--model FILE.gguf`: tiny Llama GGUF files (tests/tiny_gguf.py) served against transformers
loading the very same file (`from_pretrained(dir, gguf_file=...)`, float32, gguf-py's dequantize).

a. The file is a model source: config and tokenizer (chat template included) from its metadata.
b. float32: every weight the engine holds is transformers' weight from the file, bit for bit
   (names, q/k un-permutation, tied or not), and greedy tokens are transformers' own.
c. bf16 `auto`: each fused projection in its exact form (engine.gguf_forms), codes as stored; what
   the kernel multiplies by (un-permuted K-quant q/k blocks included) within the stated bounds.
d. Unsupported architectures and tensor types are refused at start in one line.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loramux.engine.config import EngineConfig
from loramux.engine.llm_engine import LLMEngine
from loramux.engine.sampling_params import SamplingParams
from tests.hf_reference import hf_greedy
from tests.tiny_gguf import tiny_gguf_files

MIXES = ("q4_k_m", "q5_k_m", "legacy")
PROMPTS = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,"]
NEW_TOKENS = 8
SMALL = {"kv_cache_bytes": 8 << 20, "max_model_len": 128}


@pytest.fixture(scope="module")
def gguf_files():
    """The tiny files, written once per machine (engine.model_source caches what it reads from them)."""
    return tiny_gguf_files()


def _hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


# -- a. a model source ------------------------------------------------------------------------------
def test_a_gguf_file_is_a_model_source(gguf_files, base_model_dir, tokenizer):
    from transformers import AutoTokenizer

    from loramux.engine.model_source import gguf_source, model_name, resolve_model
    from loramux.engine.models.spec import ModelSpec

    path = gguf_files["q4_k_m"]
    model_dir = resolve_model(path)
    assert gguf_source(model_dir) == path and not list(model_dir.glob("*.safetensors"))   # weights stay in the file
    assert model_name(model_dir) == path.stem
    spec = ModelSpec.from_dir(model_dir)
    assert (spec.num_layers, spec.hidden_size, spec.intermediate_size, spec.num_heads, spec.num_kv_heads,
            spec.head_dim, spec.vocab_size, spec.tie_word_embeddings) == (2, 256, 512, 4, 2, 64, 49152, False)
    assert ModelSpec.from_dir(resolve_model(gguf_files["legacy"])).tie_word_embeddings
    ours = AutoTokenizer.from_pretrained(model_dir)
    text = "Hello, world! <|im_start|>user\n12 + 7 = ?"
    assert ours(text)["input_ids"] == tokenizer(text)["input_ids"]
    chat = [{"role": "user", "content": "Hi there"}]
    assert ours.apply_chat_template(chat, tokenize=False) == tokenizer.apply_chat_template(chat, tokenize=False)


# -- b. float32 against transformers on the same file --------------------------------------------------
@pytest.mark.parametrize("mix", list(MIXES))
def test_float32_weights_and_greedy_are_transformers_on_the_same_file(gguf_files, tokenizer, mix):
    from loramux.engine.model_source import resolve_model
    from loramux.engine.models.loader import FUSED

    path = gguf_files[mix]
    engine = LLMEngine(EngineConfig(resolve_model(path), dtype="float32", **SMALL))
    assert engine.quantize == "none"
    hf = _hf(path)
    hf_sd = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    model = engine.model
    assert torch.equal(model.embed_tokens, hf_sd["embed_tokens.weight"])
    assert torch.equal(model.lm_head.weight, hf_sd["lm_head.weight"])
    assert torch.equal(model.norm.weight, hf_sd["norm.weight"])
    for i, layer in enumerate(model.layers):
        for attr, group in FUSED.items():
            parts = [hf_sd[f"layers.{i}.{'self_attn' if m[0] in 'qkvo' else 'mlp'}.{m}.weight"] for m in group]
            assert torch.equal(getattr(layer, attr).weight, torch.cat(parts)), (mix, i, attr)
        assert torch.equal(layer.input_layernorm.weight, hf_sd[f"layers.{i}.input_layernorm.weight"])
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    seqs = engine.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
    for p, seq in zip(prompts, seqs):
        assert seq.output_token_ids == hf_greedy(hf, p, NEW_TOKENS), mix


# -- c. bf16 auto: the exact form of each projection --------------------------------------------------
def test_auto_serves_each_projection_in_its_exact_form(gguf_files):
    from loramux.engine.gguf_forms import requant_int8_bound, requantized_int8, stored_form_bound
    from loramux.engine.gguf_weights import GGUFWeights
    from loramux.engine.linear import DenseLinear, Int4Linear, native_available, pack_int4
    from loramux.engine.model_source import resolve_model

    engine = LLMEngine(EngineConfig(resolve_model(gguf_files["q4_k_m"]), dtype="bfloat16", **SMALL))
    assert engine.quantize == "gguf"
    spec, model = engine.spec, engine.model
    codes = GGUFWeights(gguf_files["q4_k_m"], spec.num_heads, spec.num_kv_heads)
    for layer in model.layers:
        # q, k Q4_K + v Q6_K -> two parts; o, gate|up Q4_K -> one part as stored; down Q6_K -> two parts
        assert [getattr(layer, a).num_parts for a in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")] == \
            [2, 1, 1, 2]
        o = codes.blocks(f"layers.{layer.layer}.self_attn.o_proj.weight")
        packed, scales_zeros = pack_int4(o.codes, o.scale, o.zero)
        assert torch.equal(layer.o_proj.packed0, packed) and torch.equal(layer.o_proj.scales_zeros0, scales_zeros)
        if native_available():      # the native kernel reads the blocks at every row count: no copy
            assert layer.o_proj.dense is None
        else:
            assert torch.equal(layer.o_proj.dense,
                               codes.dequantized(f"layers.{layer.layer}.self_attn.o_proj.weight").to(torch.bfloat16))
    # what the kernel multiplies by (un-permuted q/k codes and scales, Q6_K v requantized) against the file
    qkv, names = model.layers[1].qkv_proj, [f"layers.1.self_attn.{m}_proj.weight" for m in "qkv"]
    kernel = Int4Linear([(qkv.packed0, qkv.scales_zeros0), (qkv.packed1, qkv.scales_zeros1)], qkv.out_features)
    file_w = [codes.dequantized(n) for n in names]
    v = requantized_int8(file_w[2])
    bound = torch.cat([stored_form_bound(file_w[0], codes.blocks(names[0])),
                       stored_form_bound(file_w[1], codes.blocks(names[1])),
                       stored_form_bound(file_w[2], v) + requant_int8_bound(file_w[2]).repeat_interleave(32, -1)])
    assert ((kernel.dequantized() - torch.cat(file_w)).abs() <= bound * (1 + 1e-6)).all()
    assert isinstance(model.lm_head, Int4Linear) and model.lm_head.num_parts == 2      # Q6_K head: int8 groups
    # all projections in 4-bit blocks: `auto` is plain int4 (the file's codes); float parts stay dense
    assert LLMEngine(EngineConfig(resolve_model(gguf_files["all_4bit"]), dtype="bfloat16", **SMALL)).quantize == "int4"
    legacy = LLMEngine(EngineConfig(resolve_model(gguf_files["legacy"]), dtype="bfloat16", **SMALL))
    assert legacy.quantize == "gguf"
    first = legacy.model.layers[0]
    assert isinstance(first.o_proj, DenseLinear) and isinstance(first.down_proj, DenseLinear)   # F16, BF16
    assert first.qkv_proj.num_parts == 2 and first.gate_up_proj.num_parts == 1                 # Q8_0 v; Q4_1|Q4_0


# -- d. refusals ------------------------------------------------------------------------------------------
def _tiny_file(path: Path, arch: str, kind: str, tensor: str = "blk.0.attn_q.weight") -> Path:
    """A file with one 256 x 256 tensor of `kind` (random bytes) and no other metadata."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

    qtype = GGMLQuantizationType[kind]
    block, size = GGML_QUANT_SIZES[qtype]
    w = GGUFWriter(path, arch)
    w.add_tensor(tensor, np.random.default_rng(0).integers(0, 256, (256, 256 // block * size),
                                                                          dtype=np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch, kind, tensor, named", [
    ("qwen2", "Q4_K", "blk.0.attn_q.weight", "'qwen2' is not supported yet"),
    ("falcon", "Q4_K", "blk.0.attn_q.weight", "'falcon' is not supported"),
    ("llama", "Q3_K", "blk.0.attn_q.weight", "tensor type Q3_K (blk.0.attn_q.weight)"),
    ("llama", "IQ4_XS", "blk.0.attn_q.weight", "tensor type IQ4_XS"),
    ("llama", "Q4_K", "rope_freqs.weight", "rope scaling (rope_freqs"),        # Llama 3.x: never served wrong
    ("llama", "Q4_K", "blk.0.attn_q.bias", "tensor blk.0.attn_q.bias is not one loramux serves"),
])
def test_unsupported_files_are_refused_in_one_line(tmp_path, arch, kind, tensor, named):
    from loramux.engine.model_source import ModelSourceError, resolve_model

    with pytest.raises(ModelSourceError) as err:
        resolve_model(_tiny_file(tmp_path / f"{arch}-{kind}.gguf", arch, kind, tensor))
    assert named in str(err.value) and "\n" not in str(err.value)


def test_serve_refuses_an_unsupported_file_in_one_line(tmp_path):
    path = _tiny_file(tmp_path / "q3.gguf", "llama", "Q3_K")
    out = subprocess.run([sys.executable, "-m", "loramux", "serve", "--model", str(path), "--data-dir",
                          str(tmp_path / "data")], check=False, capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parent.parent)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert len(lines) == 1 and "Q3_K" in lines[0], lines
