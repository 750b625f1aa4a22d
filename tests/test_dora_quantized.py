"""DoRA on a quantized base: the weight norm is of the dequantized weight, as peft takes it.

* `dequantize_projection` returns, for every resident form, the weight the projection multiplies by.
* bnb-nf4 vs transformers + peft with BitsAndBytesConfig (nf4, float32 compute). On AVX512-BF16 CPUs
  bitsandbytes repacks nf4 weights for its CPU kernel at the first forward (absmax rounded to bf16)
  and its `dequantize_4bit` then misreads them, so peft's own DoRA computes garbage there (measured:
  27 logits off, another argmax). The oracle therefore takes peft's weight norms before that first
  forward (peft's own dequantize and `get_weight_norm`, kept by its DoRA cache). We dequantize what
  the engine holds (bf16 absmax once repacked): each factor within 2^-8 of peft's, the bound of
  that rounding (2^-9 per absmax, of a norm over whole blocks; measured 4.3e-4, 0 where nothing is
  repacked). With our factors in peft's cache, what is left is arithmetic: we scale (base + LoRA)
  once, peft adds `(f - 1) * base + f * s * lora` to the base, an ulp apart, and the nf4 kernel
  rounds each projection's input to bf16, which can turn an ulp into a few tenths of a logit
  (tests/test_quantized.py's NEAR_TIE, measured 0.35 here). So logits within NF4_TOL of peft's and
  greedy tokens identical or parting at a near tie; in a mixed step each row as that request next
  to one base request (the same LoRA path), within 1e-3.
* int4, the default resident form: a DoRA adapter is one of tests/test_int4.py's variants (bf16
  engine vs float32 transformers + peft, within the bound of transformers' own bf16 run).
"""
from __future__ import annotations

import pytest
import torch

from loramux.adapters_registry.dora import with_dora_factors
from loramux.adapters_registry.formats import inspect_adapter, load_adapter
from loramux.engine import native_quant
from loramux.engine.config import EngineConfig
from loramux.engine.quantize import dequantize_projection, make_projection
from loramux.engine.sampling_params import SamplingParams
from loramux.server.bootstrap import build_engine
from tests.adapter_factory import make_adapters
from tests.engine_steps import first_step_logits
from tests.test_dora_engine import DORA, PROMPTS

LOGIT_TOL = 1e-3
NF4_TOL = 1.0                 # tests/test_quantized.py NEAR_TIE: ulps amplified by bf16 input rounding
NEW_TOKENS = 12
ADAPTERS = {name: DORA[name] for name in ("dora-qv-r8", "dora-all-r16")}


@pytest.mark.parametrize("mode", ["none", "int8", "int4", "bnb-nf4"])
def test_dequantized_weight_is_what_the_projection_multiplies_by(mode):
    """x @ W^T with W = dequantize_projection(proj) reproduces proj(x): exactly up to float32 sums
    (none), up to one bf16 rounding of the output for the bf16 kernels (ATen's int8, int4's dense copy
    with 24 rows, bnb's nf4 CPU kernel) and float32 sums for the native int8/int4 kernel, while a
    misread layout would be off by the outputs' own size."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(192, 576, generator=gen) * 0.05
    proj = make_projection(mode, weight, torch.float32)
    x = torch.randn(24, 576, generator=gen)
    if mode != "none":
        x = x.bfloat16().float()                     # what the kernels multiply: rounding x is not at issue
    if getattr(proj, "native", False):               # the native kernel multiplies x's int8 form: take that
        qx, dx, _ = native_quant.quantize_rows(x)    # (quantizing it again gives the same codes and scales)
        x = (qx.float().view(24, -1, 32) * dx.unsqueeze(-1)).view(24, 576)
    y = proj(x).float()
    expected = x.double() @ dequantize_projection(proj).double().T
    tol = 1e-5 if mode == "none" else 2 ** -7
    assert (y - expected).abs().max() <= tol * expected.abs().max()


def test_int4_without_its_dense_copy_reads_the_kernels_weights():
    from loramux.engine.linear import Int4Linear, quantize_int4

    proj = Int4Linear.from_codes(*quantize_int4(torch.randn(96, 128) * 0.05))
    bare = Int4Linear([(proj.packed0, proj.scales_zeros0)], 96, dense=None)
    # The kernel's bf16 zero and scale, its bf16 output and the dense copy's bf16 each round once by at
    # most 2^-9 of the weights' size: within 2^-7 of it, where a misread layout is off by the size itself.
    assert (bare.dequantized() - proj.dequantized()).abs().max() <= 2 ** -7 * proj.dequantized().abs().max()


@pytest.fixture(scope="module")
def adapter_dirs(base_model_dir, tmp_path_factory) -> dict:
    dirs = make_adapters(base_model_dir, tmp_path_factory.mktemp("dora-quant"), ADAPTERS)
    return {**dirs, "lora": make_adapters(base_model_dir, tmp_path_factory.mktemp("dora-quant-lora"), {
        "lora": dict(kind="lora", r=8, alpha=16, targets=("q_proj", "down_proj"), seed=31, b_std=0.05)})["lora"]}


def _factors(engine, folder) -> dict:
    manifest = inspect_adapter(folder, engine.spec, max_rank=16, max_virtual_tokens=0)
    weights = load_adapter(folder, manifest, engine.spec, dtype=torch.float32, device=torch.device("cpu"))
    return with_dora_factors(weights, engine.model, engine.spec).dora_factors


def _dora_layers(peft_model, adapter: str) -> dict:
    """(layer, module) -> peft's LoRA layer holding `adapter`'s DoRA magnitude."""
    out = {}
    for name, mod in peft_model.named_modules():
        if adapter in getattr(mod, "lora_magnitude_vector", {}):
            parts = name.split(".")
            out[int(parts[parts.index("layers") + 1]), parts[-1]] = mod
    return out


def _check_same_or_near_tie(engine, adapter, prompt: list[int], got: list[int], ref: list[int]) -> None:
    """Greedy tokens equal peft's, or part from them where the two best logits are within NF4_TOL."""
    if got == ref:
        return
    j = next(k for k, (a, b) in enumerate(zip(got, ref)) if a != b)
    (logits,) = first_step_logits(engine, [(adapter, 0)], [prompt + ref[:j]])
    top = logits.topk(2)
    assert set(top.indices.tolist()) == {got[j], ref[j]} and top.values[0] - top.values[1] < NF4_TOL, (adapter, j)


@torch.no_grad()
def _hf_greedy(model, ids: list[int]) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding with HF's KV cache, one token per forward as the engine decodes."""
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    first, tokens = out.logits[0, -1].float(), []
    while True:
        tokens.append(int(out.logits[0, -1].argmax()))
        if len(tokens) == NEW_TOKENS:
            return tokens, first
        out = model(input_ids=torch.tensor([tokens[-1:]]), past_key_values=out.past_key_values, use_cache=True)


def test_nf4_matches_peft_on_bitsandbytes(base_model_dir, adapter_dirs, tokenizer, tmp_path):
    import peft.tuners.lora.dora as peft_dora
    from peft import PeftModel
    from peft.utils.integrations import dequantize_module_weight
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    econf = EngineConfig(base_model_dir, dtype="float32", kv_cache_bytes=32 << 20, max_loras=3, max_lora_rank=16,
                         quantize="bnb-nf4")
    engine = build_engine(econf, tmp_path, adapter_dirs)[0]
    quantized = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32, quantization_config=
                                                     BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                        bnb_4bit_compute_dtype=torch.float32))
    model = PeftModel.from_pretrained(quantized, str(adapter_dirs["dora-qv-r8"]), adapter_name="dora-qv-r8")
    model.load_adapter(str(adapter_dirs["dora-all-r16"]), adapter_name="dora-all-r16")
    model.eval()
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    caching = peft_dora.ENABLE_DORA_CACHING
    peft_dora.ENABLE_DORA_CACHING = True
    try:
        for name in ADAPTERS:
            ours = _factors(engine, adapter_dirs[name])
            layers = _dora_layers(model, name)
            assert set(layers) == set(ours)
            for key, mod in layers.items():            # peft's norm, taken before any forward repacks nf4
                dora = mod.lora_magnitude_vector[name]
                with torch.no_grad():
                    norm = dora.get_weight_norm(dequantize_module_weight(mod.get_base_layer()).float(),
                                                mod.lora_B[name].weight @ mod.lora_A[name].weight, mod.scaling[name])
                    assert ((ours[key] * norm / dora.weight) - 1).abs().max() <= 2 ** -8, key
                    dora._cache_store(f"weight-norm-{name}", dora.weight / ours[key])    # our factors for peft
        for name in ADAPTERS:
            model.set_adapter(name)
            for i, ids in enumerate(prompts):
                tokens, ref_logits = _hf_greedy(model, ids)
                with model.disable_adapter():
                    base_logits = _hf_greedy(model, ids)[1]
                assert (ref_logits - base_logits).abs().max() > 3 * NF4_TOL, (name, i)  # the adapter's effect
                (logits,) = first_step_logits(engine, [(name, i)], prompts)
                assert (logits - ref_logits).abs().max().item() < NF4_TOL, (name, i)
                out = engine.generate([ids], SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True),
                                      [name])[0]
                _check_same_or_near_tie(engine, name, ids, out.output_token_ids, tokens)
    finally:
        peft_dora.ENABLE_DORA_CACHING = caching
    # Mixed with plain LoRA and base requests: each row as the same request next to one base request
    # (the step's LoRA then takes the embedding bag, as in the mixed step; see tests/test_quantized.py).
    jobs = [(a, i) for a in (*ADAPTERS, "lora", None) for i in range(len(prompts))]
    mixed = first_step_logits(engine, jobs, prompts)
    for job, row in zip(jobs, mixed):
        alone = first_step_logits(engine, [job] + [(None, job[1])] * (job[0] is not None), prompts)[0]
        assert (row - alone).abs().max().item() < LOGIT_TOL, job
