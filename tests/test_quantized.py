"""bitsandbytes resident base (`EngineConfig.quantize` = bnb-int8 | bnb-nf4) against transformers + peft.

The oracle loads the same checkpoint with `BitsAndBytesConfig` (load_in_8bit, or load_in_4bit with
nf4 and compute dtype float32; everything else at transformers' defaults, lm_head and embeddings
not quantized) and wraps it with peft for the LoRA and prefix adapters. Both sides then hold
bit-identical quantized weights and run the same bitsandbytes CPU kernels (on AVX512-BF16 CPUs the
nf4 kernel multiplies in bf16 whatever the compute dtype, on both sides), so what is left to
differ is our attention/RoPE/norm arithmetic versus HF's, as in the float32 oracle test. Our q|k|v
and gate|up projections are fused, one bitsandbytes module each: its quantized weight holds exactly
the per-projection blocks transformers holds, since LLM.int8() quantizes row by row and nf4 blocks of
64 never straddle rows (every d_in here is a multiple of 64).

Tolerance: first-step logits within 1e-3 (max abs; logits here are O(20)). Measured on this
machine: <= 1e-5 for base, LoRA and prefix, int8 and nf4 alike (the unquantized float32 engine
matches HF to ~7e-6; quantization does not widen the gap because the inputs of the quantized
matmuls agree to that precision). Greedy tokens: identical, 12 new tokens on 3 prompts for the
base model, a LoRA on every projection and a prefix adapter, each request alone, EOS ignored.

References decode one token per forward with HF's KV cache, as our engine does: LLM.int8() picks
its 16-bit outlier columns over all rows of a matmul, so re-forwarding the whole sequence would
not be the same computation. For the same reason int8 numerics depend on batch mates; see
`test_mixed_batch` for what is checked there.
"""
from __future__ import annotations

import logging

import pytest
import torch

from loramux.engine.config import EngineConfig
from loramux.engine.llm_engine import LLMEngine
from loramux.engine.quantize import INT8_THRESHOLD
from loramux.engine.sampling_params import SamplingParams
from loramux.server.bootstrap import build_engine
from tests.adapter_factory import load_peft_model, make_adapters
from tests.engine_steps import first_step_logits, ready_batch
from tests.resident_storage import expected_weight_bytes

NEW_TOKENS = 12
LOGIT_TOL = 1e-3
# Top-2 logit margin under which a mixed batch's decode may swap greedy tokens on nf4: one ulp of
# difference upstream (LoRA summed by the bag, decode attention over a padded batch) can flip one bf16
# rounding of a quantized projection's input; measured with random 1-ulp perturbations of every LoRA
# output, the logits moved by up to 0.42 (typically 0.14-0.25). Twice that, so a second flip or
# another CPU's rounding stays inside, still far below a wrong adapter's effect (>= 2.2).
NEAR_TIE = 1.0
PROMPTS = ["The capital of France is", "def square(x):", "Three facts about owls:"]
ADAPTERS = {
    "lora": {"kind": "lora", "r": 16, "alpha": 32, "targets": "all-linear", "seed": 2, "b_std": 0.04},
    "prefix": {"kind": "prefix", "num_virtual_tokens": 6, "prefix_projection": False, "seed": 6},
}
VARIANTS = [None, "lora", "prefix"]            # None = the bare quantized base model


def _bnb_config(mode: str):
    from transformers import BitsAndBytesConfig

    if mode == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


@pytest.fixture(scope="module", params=["bnb-int8", "bnb-nf4"])
def mode(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def adapter_dirs(base_model_dir, tmp_path_factory) -> dict:
    return make_adapters(base_model_dir, tmp_path_factory.mktemp("quant-adapters"), ADAPTERS)


@pytest.fixture(scope="module")
def engine(mode, base_model_dir, adapter_dirs, tmp_path_factory) -> LLMEngine:
    econf = EngineConfig(base_model_dir, dtype="float32", kv_cache_bytes=32 << 20, max_loras=2, max_lora_rank=16,
                         quantize=mode)
    return build_engine(econf, tmp_path_factory.mktemp(f"quant-data-{mode}"), adapter_dirs)[0]


@torch.no_grad()
def _hf_greedy(model, ids: list[int], cache=None, num_virtual: int = 0) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding with HF's KV cache, one token per forward as our engine decodes, starting
    from `cache` (a prefix adapter's virtual-token KV) if given. -> tokens, first-step logits."""
    out = model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True,
                attention_mask=torch.ones(1, num_virtual + len(ids), dtype=torch.long))
    first, tokens = out.logits[0, -1].float(), []
    for _ in range(NEW_TOKENS):
        tokens.append(int(out.logits[0, -1].argmax()))
        if len(tokens) == NEW_TOKENS:
            break
        out = model(input_ids=torch.tensor([tokens[-1:]]), past_key_values=out.past_key_values, use_cache=True,
                    attention_mask=torch.ones(1, num_virtual + len(ids) + len(tokens), dtype=torch.long))
    return tokens, first


@pytest.fixture(scope="module")
def reference(mode, base_model_dir, adapter_dirs, tokenizer) -> dict:
    """(variant, prompt index) -> (greedy tokens, first-step logits) from transformers + peft.

    peft wraps the freshly quantized model before its first forward: peft's loading calls
    `state_dict()`, and in bitsandbytes 0.50 that un-packs a CPU-repacked nf4 weight without
    restoring its absmax layout, so a model that already ran forward computes garbage afterwards.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    quantized = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32,
                                                     quantization_config=_bnb_config(mode))
    model = PeftModel.from_pretrained(quantized, str(adapter_dirs["lora"])).eval()
    # The prefix adapter's KV is peft's `get_prompt` (it depends on the adapter only, so any copy of
    # the base will do), fed to the quantized base as its cache. peft's own prefix `generate` loses
    # the prefix under transformers 5 (it passes it as `past_key_values` next to generate's `cache`).
    prefix = load_peft_model(base_model_dir, adapter_dirs["prefix"])
    n_virt = prefix.peft_config["default"].num_virtual_tokens
    ref = {}
    for i, prompt in enumerate(PROMPTS):
        ids = tokenizer(prompt)["input_ids"]
        ref["lora", i] = _hf_greedy(model, ids)
        with model.disable_adapter():
            ref[None, i] = _hf_greedy(model, ids)
            ref["prefix", i] = _hf_greedy(model, ids, prefix.get_prompt(batch_size=1), n_virt)
    return ref


def _params() -> SamplingParams:
    return SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)


def test_projections_are_quantized(engine, mode):
    import bitsandbytes as bnb

    from loramux.engine.linear import DenseLinear

    assert engine.quantize == mode
    kind = bnb.nn.Linear8bitLt if mode == "bnb-int8" else bnb.nn.Linear4bit
    for layer in engine.model.layers:
        for proj in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj):
            assert isinstance(proj, kind)
    # Like transformers' defaults: embeddings and the (tied) lm_head stay in the engine dtype.
    assert type(engine.model.lm_head) is DenseLinear
    assert engine.model.lm_head.weight.dtype == torch.float32
    assert engine.model.lm_head.weight is engine.model.embed_tokens


@pytest.mark.parametrize("variant", VARIANTS, ids=["base", "lora", "prefix"])
def test_alone_matches_transformers_bnb(engine, reference, tokenizer, variant):
    for i, prompt in enumerate(PROMPTS):
        ids = tokenizer(prompt)["input_ids"]
        tokens, ref_logits = reference[variant, i]
        seq = engine.add_request(f"logits-{variant}-{i}", ids, SamplingParams(max_tokens=1, temperature=0), variant)[0]
        logits = engine.runner.run(ready_batch(engine))[0]
        engine.abort(seq.request_id)
        diff = (logits - ref_logits).abs().max().item()
        assert diff < LOGIT_TOL, (variant, i, diff)
        _check_greedy_up_to_near_ties(engine, variant, ids, tokens)
    if variant is not None:
        assert any(reference[variant, i][0] != reference[None, i][0] for i in range(len(PROMPTS))), \
            "the adapter must change the output, or this test proves nothing"


def _check_greedy_up_to_near_ties(engine: LLMEngine, variant, ids: list[int], ref: list[int],
                                  partings_left: int = 2) -> None:
    """Greedy tokens equal transformers', or part only at a near tie, after which the engine, re-run
    from the reference's own token at that point, goes on to the reference's next tokens.

    Why ties can part here at all (issue #24, seen with bitsandbytes 0.50.2 on another x86 CPU than
    the one these were first measured on): both sides compute in float32 around the quantized
    matmuls, but not in the same order (our fused q|k|v and attention against HF's modules, BLAS
    kernels chosen per CPU), so their inputs to each quantized matmul differ by ~1e-6. nf4 rounds
    that input to bf16 and LLM.int8() to fp16 and then to int8 per row: a discontinuous step, so a
    1e-6 difference can flip one rounding and move the logits by a few tenths (NEAR_TIE's
    measurement). Where the top two logits are that close, greedy decoding may part; a wrong or
    missing adapter cannot pass this way: its first-step logits are >= 2.2 off (LOGIT_TOL checks
    them), and after a parting the re-run must follow the reference again.
    """
    got = engine.generate([ids], _params(), [variant])[0].output_token_ids[:len(ref)]
    if got == ref:
        return
    j = next(k for k, (a, b) in enumerate(zip(got, ref)) if a != b)
    assert partings_left > 0, (variant, "greedy tokens part again", j, got, ref)
    logits = first_step_logits(engine, [(variant, 0)], [ids + ref[:j]])[0]
    top = logits.topk(2)
    assert set(top.indices.tolist()) == {got[j], ref[j]}, (variant, j, top)
    assert top.values[0] - top.values[1] < NEAR_TIE, (variant, j, top.values)
    if j + 1 < len(ref):
        _check_greedy_up_to_near_ties(engine, variant, ids + ref[:j + 1], ref[j + 1:], partings_left - 1)


def test_mixed_batch(engine, reference, tokenizer, mode):
    """Base, LoRA and prefix requests (3 prompts each) in the same steps on the quantized base.

    What couples rows, measured (tests/test_quantized.py history, issue #14):
      * int8: LLM.int8() computes in 16 bit every activation column that holds an outlier (|x| > 6) in
        ANY row of the matmul, so a request's logits move (by ~1-3 here) with its batch mates, in
        transformers too. With the outlier threshold at 0 every int8 step is per row (fp16 cast,
        per-row absmax, rounding, an exact integer matmul), and so is nf4 (per-row bf16 rounding).
      * LoRA: a lone request takes the `single` path (peft's own BLAS calls, so it matches peft bit
        for bit: test_alone_matches_transformers_bnb); a batch of several adapters takes the
        embedding bag, which sums in another order. One ulp there can push an activation across an
        fp16/int8 (or bf16) rounding point in a later quantized projection, and that one flipped code
        grows to ~0.75 logits by the last layer (measured: layer 28 of 30, one code of 576) — or,
        with another CPU's rounding of the same sums, to ~2.4, the size of the adapter's own effect.
        So no fixed bound between `single` and the bag both holds on every CPU and still catches a
        wrong adapter.
    The property that does hold on any x86 CPU: each bag of an embedding bag is summed on its own, in
    index order, whatever the other bags are. So the reference for a LoRA row is the same request
    run through the bag in a step with just one bare-base request. Then every row of the mixed
    batch equals its reference before the lm_head bit for bit, and the logits differ only by the
    float32 lm_head's row-count-dependent rounding (measured <= 4e-5; bounded by LOGIT_TOL = 1e-3,
    while a wrong or missing adapter moves them by >= 2.2).
    """
    import bitsandbytes as bnb

    jobs = [(v, i) for v in VARIANTS for i in range(len(PROMPTS))]
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    int8 = [m for m in engine.model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    for m in int8:
        m.state.threshold = 0.0
    try:
        # A LoRA request next to one base request: its LoRA goes through the bag, as in the mixed batch.
        alone = [first_step_logits(engine, [job] + [(None, job[1])] * (job[0] == "lora"), prompts)[0]
                 for job in jobs]
        mixed = first_step_logits(engine, jobs, prompts)
    finally:
        for m in int8:
            m.state.threshold = INT8_THRESHOLD
    diffs = [(a - b).abs().max().item() for a, b in zip(alone, mixed)]
    assert max(diffs) < LOGIT_TOL, list(zip(jobs, diffs))
    for i in range(len(PROMPTS)):   # the LoRA rows really are the adapter's: far from the base rows
        lora_row, base_row = mixed[jobs.index(("lora", i))], mixed[jobs.index((None, i))]
        assert (lora_row - base_row).abs().max().item() > 100 * LOGIT_TOL, i

    first_step = len(engine.stats.batch_sizes)
    seqs = engine.generate([prompts[i] for _, i in jobs], _params(), [v for v, _ in jobs])
    assert engine.stats.batch_sizes[first_step] == len(jobs)      # all of them in the same steps
    assert all(len(s.output_token_ids) == NEW_TOKENS for s in seqs)
    if mode == "bnb-nf4":
        for job, seq in zip(jobs, seqs):
            _check_parting_is_a_near_tie(engine, job, prompts[job[1]], seq.output_token_ids, reference[job][0])


def _check_parting_is_a_near_tie(engine: LLMEngine, job, prompt: list[int], got: list[int], ref: list[int]) -> None:
    """Mixed-batch greedy tokens on nf4 equal transformers' alone, or part from them only at a near tie.

    bitsandbytes' CPU nf4 kernel rounds its input to bf16, so a 1-ulp difference upstream (decode
    attention over a padded batch, a BLAS call whose blocking depends on its row count) can flip one
    rounding and move the logits by a few tenths; at a near tie that parts greedy tokens, as it
    does in transformers' own batched generation. The first step is checked exactly above.
    """
    if got == ref:
        return
    j = next(k for k, (a, b) in enumerate(zip(got, ref)) if a != b)
    logits = first_step_logits(engine, [(job[0], 0)], [prompt + ref[:j]])[0]   # the lone run at the parting
    top = logits.topk(2)
    assert set(top.indices.tolist()) == {got[j], ref[j]}, (job, j)
    assert top.values[0] - top.values[1] < NEAR_TIE, (job, j, top.values)


def test_weight_bytes_count_quantized_storage(engine, mode):
    """The served model: packed weights + their scales + full-precision embeddings and norms."""
    expected, n_linears = expected_weight_bytes(engine.spec, mode)
    # The only extra: a 16- or 256-entry codebook per linear.
    assert expected <= engine.weight_bytes <= expected + 1024 * n_linears


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from tests.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-untied"))


@pytest.mark.parametrize("quantize", ["none", "int4", "int8", "bnb-nf4", "bnb-int8"])
def test_resident_bytes_on_a_tiny_untied_model(tiny_checkpoint, quantize):
    """An ordinary (no GGUF) untied checkpoint loaded in each form: storage as expected, exactly for
    our own modules, up to a codebook per linear for bitsandbytes'."""
    from loramux.engine.models.loader import load_model
    from loramux.engine.quantize import resident_bytes
    from tests.adapter_factory import TINY_SPEC

    model = load_model(TINY_SPEC, tiny_checkpoint, dtype=torch.float32, quantize=quantize, max_positions=64,
                       device=torch.device("cpu"))
    expected, n_linears = expected_weight_bytes(TINY_SPEC, quantize)
    if quantize.startswith("bnb-"):
        assert expected <= resident_bytes(model) <= expected + 1024 * n_linears
    else:
        assert resident_bytes(model) == expected


def test_metrics_report_quantized_bytes(engine):
    from loramux.engine.async_engine import AsyncEngine
    from loramux.server.app import create_app
    from loramux.server.state import ServerState

    state = ServerState(engine=AsyncEngine(engine), tokenizer=engine.tokenizer, base_model_name="base")
    create_app(state)                              # binds the gauges; the engine thread is never started
    text = state.metrics.render().decode()
    line = next(ln for ln in text.splitlines() if ln.startswith('loramux_memory_bytes{kind="base_weights"}'))
    assert float(line.split()[-1]) == engine.weight_bytes


def test_config_and_cli_accept_only_known_modes(base_model_dir):
    import argparse

    from loramux.engine.quantize import MODES
    from loramux.server.cli import add_serve_parser

    with pytest.raises(ValueError, match="quantize"):
        EngineConfig(base_model_dir, quantize="int3")
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    for mode in ("auto", "none", "int4", "int8", "bnb-nf4", "bnb-int8"):
        assert mode in MODES
        assert parser.parse_args(["serve", "--quantize", mode]).quantize == mode
        assert EngineConfig(base_model_dir, quantize=mode).quantize == mode
    assert parser.parse_args(["serve"]).quantize == EngineConfig(base_model_dir).quantize == "auto"
    for bad in ("fp8", "int3", "nf4"):           # nf4 is bnb-nf4 now: no silent alias
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", "--quantize", bad])


def test_no_per_call_bnb_warnings(engine, tokenizer, caplog):
    with caplog.at_level(logging.WARNING):
        engine.generate([tokenizer(PROMPTS[0])["input_ids"]], SamplingParams(max_tokens=2, temperature=0))
    assert not [r for r in caplog.records if r.name.startswith("bitsandbytes")]
