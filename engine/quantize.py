"""Quantized resident base model: each projection adapters may target becomes a bitsandbytes linear.

    quantize_model(model, "int8" | "nf4" | "none", compute_dtype)

Only the decoder projections (q/k/v/o, gate/up/down) are quantized; embeddings, norms and the
lm_head stay in the engine dtype. That is what transformers' `BitsAndBytesConfig` does by default
(`get_keys_to_not_convert` skips tied weights and the output embedding), so a loramux int8/nf4
base and `from_pretrained(..., quantization_config=BitsAndBytesConfig(...))` hold the same numbers.
The settings below are transformers' defaults for the same reason:
  int8: `Linear8bitLt(has_fp16_weights=False, threshold=6.0)` (LLM.int8() with outlier columns
        of the activations computed in 16 bit).
  nf4:  `Linear4bit(quant_type="nf4", blocksize=64, compress_statistics=False, uint8 storage)`,
        compute dtype = the engine dtype.
LoRA still runs on top in the engine dtype: `add_lora` adds `scale * (x A^T) B^T` to whatever
the projection returns, so adapters need no change at all.

CPU notes (bitsandbytes >= 0.49 ships a CPU backend): int8 quantizes activations per row and runs
`torch._int_mm`; nf4 on AVX512-BF16 CPUs repacks the weight on first use and multiplies in bf16
whatever the compute dtype. We trigger that repacking here, so the resident bytes reported at
start-up are the bytes held while serving.

Two properties to know (both come from bitsandbytes, and transformers has them too):
  - int8 depends on batch mates: LLM.int8() computes in 16 bit every activation column with an
    outlier (|x| > threshold) in ANY row of the matmul, so a request's logits move (by ~1-3 here)
    with the other tokens in its step. nf4 is per-row, but on the CPU it rounds its input to bf16:
    a LoRA request in a mixed batch (its LoRA summed in another order than alone) may see one
    rounding flip, a few tenths of a logit (tests/test_quantized.py bounds it).
  - never call `state_dict()` on a CPU nf4 model after its first forward: in bitsandbytes 0.50
    `Linear4bit._save_to_state_dict` un-packs the CPU layout without restoring absmax's layout
    (non-nested case) and the next forward computes garbage. Nothing in loramux does.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from loramux.engine.models.spec import LORA_TARGETS

MODES = ("none", "int8", "nf4")
INT8_THRESHOLD = 6.0          # transformers' BitsAndBytesConfig.llm_int8_threshold default
NF4_BLOCKSIZE = 64            # bitsandbytes' default, what transformers uses

log = logging.getLogger("loramux.quantize")


class _DropMessage(logging.Filter):
    """Drops one known, per-call bitsandbytes warning (it would log on every int8 matmul)."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _import_bnb():
    import bitsandbytes as bnb

    fn_log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropMessage) for f in fn_log.filters):
        fn_log.addFilter(_DropMessage("MatMul8bitLt: inputs will be cast"))
    return bnb


def quantize_model(model: nn.Module, mode: str, compute_dtype: torch.dtype) -> int:
    """Swap every projection named in LORA_TARGETS (an nn.Linear) for its bitsandbytes form, in place.

    Call after the weights are loaded and cast to `compute_dtype` (the quantizer reads them).
    Returns the number of linears quantized.
    """
    if mode not in MODES:
        raise ValueError(f"quantize must be one of {MODES}, got {mode!r}")
    if mode == "none":
        return 0
    bnb = _import_bnb()
    count = 0
    projections = [(parent, name, child) for parent in model.modules()
                   for name, child in parent.named_children() if name in LORA_TARGETS]
    for parent, name, linear in projections:
        if type(linear) is not nn.Linear:
            continue                                    # already quantized
        q = _int8(bnb, linear) if mode == "int8" else _nf4(bnb, linear, compute_dtype)
        q.requires_grad_(False)
        q.eval()
        _warm_up(q, linear.weight.device, compute_dtype)
        setattr(parent, name, q)
        count += 1
    log.info("quantized %d linears to %s (compute dtype %s)", count, mode, compute_dtype)
    return count


def _int8(bnb, linear: nn.Linear) -> nn.Module:
    device = linear.weight.device
    with torch.device("meta"):
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, threshold=INT8_THRESHOLD)
    # Int8Params quantizes (via fp16, row-wise absmax) when moved from CPU to a real device.
    q.weight = bnb.nn.Int8Params(linear.weight.data.to("cpu"), requires_grad=False,
                                 has_fp16_weights=False).to(device)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q


def _nf4(bnb, linear: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    device = linear.weight.device
    with torch.device("meta"):
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=False, quant_type="nf4",
                              quant_storage=torch.uint8)
    # Params4bit quantizes on its first move to a real device.
    q.weight = bnb.nn.Params4bit(linear.weight.data.to("cpu"), requires_grad=False, blocksize=NF4_BLOCKSIZE,
                                 compress_statistics=False, quant_type="nf4", quant_storage=torch.uint8,
                                 module=q).to(device)
    q.quant_state = q.weight.quant_state
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q


@torch.no_grad()
def _warm_up(q: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """One tiny forward: int8 moves its weight into the matmul state and nf4 repacks for the CPU
    kernel here, once, outside inference mode and before memory is reported."""
    q(torch.zeros(1, q.in_features, device=device, dtype=dtype))


def _quant_tensors(module: nn.Module):
    """Tensors a bitsandbytes linear holds besides its parameters (scales, codebooks)."""
    weight = getattr(module, "weight", None)
    qs = getattr(weight, "quant_state", None)
    while qs is not None:                               # Params4bit: absmax, code, nested state2
        yield from (t for t in (qs.absmax, qs.code, getattr(qs, "offset", None)) if isinstance(t, torch.Tensor))
        qs = getattr(qs, "state2", None)
    for holder in (weight, getattr(module, "state", None)):  # Int8Params / MatmulLtState: CB, SCB
        for name in ("CB", "SCB"):
            t = getattr(holder, name, None)
            if isinstance(t, torch.Tensor):
                yield t


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every weight the model holds, each storage counted once (tied weights, the int8
    weight shared with its matmul state), quantization scales and codebooks included."""
    storages: dict[int, int] = {}
    for module in model.modules():
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False), *_quant_tensors(module)]
        for t in tensors:
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())
