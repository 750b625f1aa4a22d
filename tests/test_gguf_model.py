"""`--model FILE.gguf`: tiny Llama GGUF files (tests/tiny_gguf.py) served against transformers
loading the very same file (`from_pretrained(dir, gguf_file=...)`, float32, gguf-py's dequantize).

a. The file is a model source: config and tokenizer (chat template included) from its metadata.
b. float32: every weight the engine holds is transformers' weight from the file, bit for bit
   (names, q/k un-permutation, tied or not), and greedy tokens are transformers' own.
c. bf16 `auto`: each fused projection in its exact form (engine.gguf_forms), codes as stored; what
   the kernel multiplies by (un-permuted K-quant q/k blocks included) within the stated bounds.
d. Unsupported architectures and tensor types are refused at start in one line.
e. qwen2, qwen3, phi3, gemma3 and Mistral (as llama.cpp writes it: "llama"): tiny random HF
   checkpoints converted as llama.cpp's converter converts them (tests/tiny_gguf.convert_checkpoint),
   F32 / F16 / Q8_0 / a Q4_0-Q4_1-Q8_0-F16 mix. transformers undoes the conversion back to the
   source checkpoint (so the helper's permutation and norm shift are the ones its loader undoes); our
   float32 weights are transformers' from the same file bit for bit, logits within 1e-4 and greedy
   tokens identical; bf16 `auto` holds every projection's blocks within the stated bounds.
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
from tests.tiny_gguf import ARCH_MIXES, arch_gguf_file, finish_gguf, tiny_gguf_files

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
@pytest.mark.parametrize("bf16_hardware", [True, False], ids=["bf16-hardware", "no-bf16-hardware"])
def test_auto_serves_each_projection_in_its_exact_form(gguf_files, monkeypatch, bf16_hardware):
    """Both CPUs' choices, on any CPU (the choice is a function of the CPU's features; what each form
    multiplies by is not): one int4 part for 4-bit blocks; the 8-bit types in two parts, or dense
    bf16 where the CPU multiplies bf16 in hardware (faster at every row count)."""
    from loramux.engine import gguf_forms
    from loramux.engine.gguf_forms import requant_int8_bound, requantized_int8, stored_form_bound
    from loramux.engine.gguf_weights import GGUFWeights
    from loramux.engine.linear import DenseLinear, Int4Linear, native_available, pack_int4
    from loramux.engine.model_source import resolve_model

    monkeypatch.setattr(gguf_forms, "bf16_matmul_in_hardware", lambda: bf16_hardware)
    engine = LLMEngine(EngineConfig(resolve_model(gguf_files["q4_k_m"]), dtype="bfloat16", **SMALL))
    assert engine.quantize == "gguf"
    spec, model = engine.spec, engine.model
    codes = GGUFWeights(gguf_files["q4_k_m"], spec.num_heads, spec.num_kv_heads)
    for layer in model.layers:
        # q, k Q4_K + v Q6_K -> two parts (or dense); o, gate|up Q4_K -> one part as stored; down Q6_K -> two parts
        if bf16_hardware:
            for attr, names in (("qkv_proj", [f"self_attn.{m}_proj" for m in "qkv"]), ("down_proj", ["mlp.down_proj"])):
                file_w = torch.cat([codes.dequantized(f"layers.{layer.layer}.{n}.weight") for n in names])
                proj = getattr(layer, attr)
                assert isinstance(proj, DenseLinear) and torch.equal(proj.weight, file_w.to(torch.bfloat16)), attr
            assert [getattr(layer, a).num_parts for a in ("o_proj", "gate_up_proj")] == [1, 1]
        else:
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
    if bf16_hardware:
        assert isinstance(model.lm_head, DenseLinear)                                 # Q6_K head, untied: bf16
        assert torch.equal(model.lm_head.weight, codes.dequantized("lm_head.weight").to(torch.bfloat16))
    else:
        # what the kernel multiplies by (un-permuted q/k codes and scales, Q6_K v requantized) against the file
        qkv, names = model.layers[1].qkv_proj, [f"layers.1.self_attn.{m}_proj.weight" for m in "qkv"]
        kernel = Int4Linear([(qkv.packed0, qkv.scales_zeros0), (qkv.packed1, qkv.scales_zeros1)], qkv.out_features)
        file_w = [codes.dequantized(n) for n in names]
        v = requantized_int8(file_w[2])
        bound = torch.cat([stored_form_bound(file_w[0], codes.blocks(names[0])),
                           stored_form_bound(file_w[1], codes.blocks(names[1])),
                           stored_form_bound(file_w[2], v) + requant_int8_bound(file_w[2]).repeat_interleave(32, -1)])
        assert ((kernel.dequantized() - torch.cat(file_w)).abs() <= bound * (1 + 1e-6)).all()
        assert isinstance(model.lm_head, Int4Linear) and model.lm_head.num_parts == 2  # Q6_K head: int8 groups
    # all projections in 4-bit blocks: `auto` is plain int4 (the file's codes); float parts stay dense
    assert LLMEngine(EngineConfig(resolve_model(gguf_files["all_4bit"]), dtype="bfloat16", **SMALL)).quantize == "int4"
    legacy = LLMEngine(EngineConfig(resolve_model(gguf_files["legacy"]), dtype="bfloat16", **SMALL))
    assert legacy.quantize == "gguf"
    first = legacy.model.layers[0]
    assert isinstance(first.o_proj, DenseLinear) and isinstance(first.down_proj, DenseLinear)   # F16, BF16
    assert first.gate_up_proj.num_parts == 1                                                   # Q4_1|Q4_0
    assert isinstance(first.qkv_proj, DenseLinear) if bf16_hardware else first.qkv_proj.num_parts == 2   # Q8_0 v


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
    finish_gguf(w)
    return path


@pytest.mark.parametrize("arch, kind, tensor, named", [
    ("gemma2", "Q4_K", "blk.0.attn_q.weight", "'gemma2' is not supported yet"),
    ("falcon", "Q4_K", "blk.0.attn_q.weight", "'falcon' is not supported"),
    ("llama", "Q3_K", "blk.0.attn_q.weight", "tensor type Q3_K (blk.0.attn_q.weight)"),
    ("llama", "IQ4_XS", "blk.0.attn_q.weight", "tensor type IQ4_XS"),
    ("llama", "Q4_K", "rope_freqs.weight", "rope_freqs.weight (36864 factors) is not Llama 3.x's llama3"),
    ("qwen2", "Q4_K", "rope_factors_long.weight", "rope scaling rope_factors_long in a GGUF file of architecture 'qwen2'"),
    ("qwen2", "Q4_K", "blk.0.attn_q_norm.weight", "tensor blk.0.attn_q_norm.weight is not one loramux serves"),
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


# -- e. the other architectures, converted as llama.cpp converts them ---------------------------------------
GGUF_ARCHS = ("qwen2", "qwen3", "phi3", "gemma3", "mistral")
# What transformers' GGUF reader drops from these (engine.gguf_config reads it back): Llama 3.x's rope_freqs,
# Phi-4-mini's longrope / partial rotary / window, Gemma 3 4B+'s linear rope scaling
DROPPED = ("llama3", "phi3-long", "gemma3-linear")
ALL_GGUF_ARCHS = (*GGUF_ARCHS, *DROPPED)
# 30-token prompts over the files' 512-token vocabulary: longer than Gemma 3's sliding window (16)
ARCH_PROMPTS = [list(range(300, 330)), [17 + (7 * i) % 480 for i in range(30)], list(range(511, 481, -1))]


def _hf_sd(path: Path) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v for k, v in _hf(path).state_dict().items()}


def _group_names(spec, layer: int, attr: str) -> list[str]:
    """HF names of the tensors behind fused projection `attr` (Phi-3: its own fused tensor)."""
    from loramux.engine.models.loader import FUSED

    group = FUSED[attr]
    parent = "self_attn" if group[0][0] in "qkvo" else "mlp"
    if spec.fused_checkpoint and len(group) > 1:
        return [f"layers.{layer}.{parent}.{attr}.weight"]
    return [f"layers.{layer}.{parent}.{m}.weight" for m in group]


@pytest.mark.parametrize("arch", ALL_GGUF_ARCHS)
def test_transformers_undoes_the_conversion_to_the_source_checkpoint(arch):
    """The helper's conventions are the ones transformers' GGUF loader undoes: its model from the F32
    file is the source checkpoint again. Exact, but Gemma's norms: stored 1 + w and read back as
    (1 + w) - 1, each rounded to float32 near 1-2 (an ulp there is at most 2^-23)."""
    from gguf import GGUFReader
    from safetensors.torch import load_file

    from tests.tiny_gguf import llama_cpp_permute

    path, src = arch_gguf_file(arch, "f32")
    source = {k.removeprefix("model."): v for k, v in load_file(src / "model.safetensors").items()}
    ours = _hf_sd(path)
    assert set(source) <= set(ours)
    for name, w in source.items():
        tol = 2.0 ** -23 if arch.startswith("gemma3") and name.endswith("norm.weight") else 0.0
        torch.testing.assert_close(ours[name], w, atol=tol, rtol=0, msg=f"{arch} {name}")
    stored = {t.name: t for t in GGUFReader(path).tensors}
    if arch.startswith("phi3"):          # q|k|v and gate|up fused, as Phi-3's own checkpoint holds them
        assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"} <= set(stored) and "blk.0.attn_q.weight" not in stored
        assert torch.equal(torch.from_numpy(stored["blk.0.attn_qkv.weight"].data.copy()),
                           source["layers.0.self_attn.qkv_proj.weight"])
    else:
        q = torch.from_numpy(stored["blk.0.attn_q.weight"].data.copy())
        want = source["layers.0.self_attn.q_proj.weight"]
        if arch in ("mistral", "llama3"):   # llama.cpp's permutation really happened (and was really undone)
            assert not torch.equal(q, want)
            want = torch.from_numpy(llama_cpp_permute(want.numpy(), 4))
        assert torch.equal(q, want)
    if arch.startswith("gemma3"):
        norm = torch.from_numpy(stored["blk.0.attn_q_norm.weight"].data.copy())
        assert torch.equal(norm, source["layers.0.self_attn.q_norm.weight"] + 1)


@pytest.mark.parametrize("mix", list(ARCH_MIXES))
@pytest.mark.parametrize("arch", GGUF_ARCHS)
def test_float32_on_each_architecture_is_transformers_on_the_same_file(arch, mix):
    """Weights bit for bit (biases, q/k norms, Gemma's four norms, Phi-3's fused tensors), last-position
    logits within 1e-4 (the tolerance of tests/test_architectures.py: fused projections and paged
    attention sum in another order, float32 rounding) and greedy tokens identical."""
    from loramux.engine.model_source import resolve_model
    from loramux.engine.models.loader import FUSED, NORMS
    from tests.engine_steps import first_step_logits

    path, _ = arch_gguf_file(arch, mix)
    engine = LLMEngine(EngineConfig(resolve_model(path), dtype="float32", max_num_batched_tokens=256, **SMALL))
    assert engine.quantize == "none"
    hf, spec, model = _hf(path), engine.spec, engine.model
    sd = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    assert torch.equal(model.embed_tokens, sd["embed_tokens.weight"])
    assert torch.equal(model.lm_head.weight, sd["lm_head.weight"])
    for i, layer in enumerate(model.layers):
        for attr in FUSED:
            parts = [sd[n] for n in _group_names(spec, i, attr)]
            assert torch.equal(getattr(layer, attr).weight, torch.cat(parts)), (arch, mix, i, attr)
        if spec.qkv_bias:
            biases = [sd[f"layers.{i}.self_attn.{m}_proj.bias"] for m in "qkv"]
            assert torch.equal(layer.biases[0], torch.cat(biases))
        # ours -> HF name: the layer holds q/k norms itself, HF under self_attn
        norms = {n: n for n in NORMS if getattr(layer, n) is not None}
        norms |= {n: f"self_attn.{n}" for n in ("q_norm", "k_norm") if getattr(layer, n) is not None}
        assert len(norms) == {"gemma3": 6, "qwen3": 4}.get(arch, 2)
        for ours, theirs in norms.items():
            want = sd[f"layers.{i}.{theirs}.weight"] + spec.norm_offset     # Gemma: 1 + w, as Gemma3RMSNorm
            assert torch.equal(getattr(layer, ours).weight, want), (arch, ours)
    with torch.no_grad():
        want = [hf(torch.tensor([p])).logits[0, -1] for p in ARCH_PROMPTS]
    for got, ref in zip(first_step_logits(engine, [(None, i) for i in range(3)], ARCH_PROMPTS), want):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    seqs = engine.generate(ARCH_PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
    for p, seq in zip(ARCH_PROMPTS, seqs):
        assert seq.output_token_ids == hf_greedy(hf, p, NEW_TOKENS), (arch, mix)


@pytest.mark.parametrize("arch", GGUF_ARCHS)
def test_auto_holds_each_architectures_blocks(arch):
    """bf16 `auto` on the Q4_0 / Q4_1 / Q8_0 / F16 file: every projection's kernel weight within
    stored_form_bound of transformers' dequantized weight from the same file (the blocks as stored,
    Phi-3's fused ones split by rows, Mistral's q/k un-permuted), F16 parts dense (exact in bf16
    rounding), and so Q8_0 ones where the CPU multiplies bf16 in hardware; Qwen2's biases unquantized."""
    from loramux.engine.gguf_blocks import split_rows
    from loramux.engine.gguf_forms import dense_beats_two_parts, stored_form_bound, two_parts
    from loramux.engine.gguf_weights import GGUFWeights
    from loramux.engine.linear import DenseLinear, Int4Linear
    from loramux.engine.model_source import resolve_model
    from loramux.engine.models.loader import FUSED

    path, _ = arch_gguf_file(arch, "q4")
    engine = LLMEngine(EngineConfig(resolve_model(path), dtype="bfloat16", **SMALL))
    assert engine.quantize == "gguf"
    spec, model, sd = engine.spec, engine.model, _hf_sd(path)
    codes = GGUFWeights(path, spec.num_heads, spec.num_kv_heads)
    for i, layer in enumerate(model.layers):
        for attr, group in FUSED.items():
            names = _group_names(spec, i, attr)
            w = torch.cat([sd[n] for n in names])
            proj = getattr(layer, attr)
            if attr == "o_proj":                                             # F16 in this mix
                assert isinstance(proj, DenseLinear) and torch.equal(proj.weight, w.to(torch.bfloat16))
                continue
            sizes = [spec.lora_dims(m)[1] for m in group]
            blocks = (split_rows(codes.blocks(names[0]), sizes) if len(names) == 1 and len(group) > 1
                      else [codes.blocks(n) for n in names])
            assert all(b is not None for b in blocks)
            if isinstance(proj, DenseLinear):              # Q8_0 parts where this CPU multiplies bf16 in hardware
                assert two_parts(blocks) and dense_beats_two_parts(torch.bfloat16), (arch, i, attr)
                assert torch.equal(proj.weight, w.to(torch.bfloat16)), (arch, i, attr)
                continue
            kernel = Int4Linear([(getattr(proj, f"packed{j}"), getattr(proj, f"scales_zeros{j}"))
                                 for j in range(proj.num_parts)], proj.out_features, native=proj.native)
            bound = torch.cat([stored_form_bound(p, b) for p, b in zip(w.split(sizes), blocks)])
            assert ((kernel.dequantized() - w).abs() <= bound * (1 + 1e-6)).all(), (arch, i, attr)
        if spec.qkv_bias:
            assert torch.equal(layer.biases[0], torch.cat([sd[f"layers.{i}.self_attn.{m}_proj.bias"]
                                                           for m in "qkv"]).to(torch.bfloat16))


@pytest.mark.parametrize("mix", ["f32", "q8_0"])
@pytest.mark.parametrize("arch", DROPPED)
def test_what_transformers_reader_drops_is_served_as_the_source_checkpoint(arch, mix):
    """Llama 3.x's rope_freqs, Phi-4-mini's longrope tables / partial rotary / sliding window, Gemma 3
    4B+'s linear scaling of its global layers: transformers' GGUF reader drops them (its model of the
    file: other logits, shown here) and engine.gguf_config reads them back. Our rope tables are those of
    the source checkpoint's config (frequencies within ROPE_RTOL, attention factor too), float32 logits
    (1e-4, as above) and greedy tokens are transformers' on the source checkpoint (F32: the same weights;
    Q8_0: the weights the file holds, loaded into the source's model)."""
    from transformers import AutoModelForCausalLM

    from loramux.engine.gguf_config import ROPE_RTOL
    from loramux.engine.model_source import resolve_model
    from loramux.engine.models.spec import ModelSpec
    from tests.engine_steps import first_step_logits

    path, src = arch_gguf_file(arch, mix)
    engine = LLMEngine(EngineConfig(resolve_model(path), dtype="float32", max_num_batched_tokens=256, **SMALL))
    want_spec = ModelSpec.from_dir(src)
    assert engine.spec.layer_window == want_spec.layer_window and engine.spec.layer_rope == want_spec.layer_rope
    assert engine.spec.max_position_embeddings == want_spec.max_position_embeddings
    for got, ref in zip(engine.spec.ropes, want_spec.ropes, strict=True):
        torch.testing.assert_close(torch.tensor(got.inv_freq, dtype=torch.float64),
                                   torch.tensor(ref.inv_freq, dtype=torch.float64), rtol=ROPE_RTOL, atol=0)
        assert abs(got.attention_scaling - ref.attention_scaling) <= ROPE_RTOL * ref.attention_scaling

    source = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    if mix != "f32":
        source.load_state_dict(_hf(path).state_dict())
    with torch.no_grad():
        want = [source(torch.tensor([p])).logits[0, -1] for p in ARCH_PROMPTS]
        misread = [_hf(path)(torch.tensor([p])).logits[0, -1] for p in ARCH_PROMPTS]
    assert max((a - b).abs().max().item() for a, b in zip(want, misread)) > 1e-2    # what was dropped matters
    for got, ref in zip(first_step_logits(engine, [(None, i) for i in range(3)], ARCH_PROMPTS), want):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    seqs = engine.generate(ARCH_PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
    for p, seq in zip(ARCH_PROMPTS, seqs):
        assert seq.output_token_ids == hf_greedy(source, p, NEW_TOKENS), (arch, mix)


def test_rope_freqs_not_of_llama3_form_are_refused_in_one_line(tmp_path):
    """Factors no llama3 rope writes (here: one below 1) are refused, not served as a guess."""
    from gguf import GGUFReader

    from loramux.engine.model_source import ModelSourceError, resolve_model

    src = arch_gguf_file("llama3", "f32")[0]
    factors = next(t for t in GGUFReader(src).tensors if t.name == "rope_freqs.weight").data.copy()
    factors[0] = 0.5
    path = _rewritten(src, tmp_path / "llama3-odd-rope.gguf", None, None, tensors={"rope_freqs.weight": factors})
    with pytest.raises(ModelSourceError) as err:
        resolve_model(path)
    assert "rope_freqs.weight" in str(err.value) and "llama3" in str(err.value) and "\n" not in str(err.value)


def _rewritten(src: Path, dst: Path, key: str | None, value, tensors: dict | None = None) -> Path:
    """A copy of F32 file `src` with one metadata value changed (`key` without the architecture prefix)
    and `tensors` (name -> array) replaced."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    from loramux.engine.gguf_weights import file_architecture

    reader = GGUFReader(src)
    arch = file_architecture(reader)
    w = GGUFWriter(dst, arch)
    for k, f in reader.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        sub = f.types[1] if f.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(k, value if k == f"{arch}.{key}" else f.contents(), f.types[0], sub_type=sub)
    for t in reader.tensors:
        w.add_tensor(t.name, (tensors or {}).get(t.name, t.data.copy()))
    finish_gguf(w)
    return dst


@pytest.mark.parametrize("arch, key, value, named", [
    ("qwen3", "attention.key_length", 64, "head_dim 64 in the file, 128 as transformers reads it"),
    ("gemma3", "attention.key_length", 128, "attention scale 1/sqrt(128) in llama.cpp, 1/sqrt(256)"),
])
def test_a_config_transformers_misreads_is_refused_in_one_line(tmp_path, arch, key, value, named):
    """Metadata transformers' reader replaces by its config class defaults (Qwen3's key_length, Phi-4-mini's
    partial rotary, Gemma 3 27B's attention scale): the model it builds is not the file's."""
    from loramux.engine.model_source import ModelSourceError, resolve_model

    path = _rewritten(arch_gguf_file(arch, "f32")[0], tmp_path / f"{arch}-wrong.gguf", key, value)
    with pytest.raises(ModelSourceError) as err:
        resolve_model(path)
    assert named in str(err.value) and "\n" not in str(err.value)
