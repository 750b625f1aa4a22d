"""The resident form of the base model's projections: ``--quantize``.

    none      dense, in the engine dtype
    int4      4-bit weights in groups of 32 with a scale and zero each (engine.linear.Int4Linear),
              on the native kernel (int8 activations, engine.native_quant) or, where it does not
              build, ATen's with bf16 activations. The embedded model serves its GGUF's own Q4_1
              codes; other checkpoints are quantized group-wise (min/max) at start.
    int8      8-bit weights, one scale per output channel, on the same CPU kernels
    bnb-nf4   bitsandbytes Linear4bit (nf4, blocks of 64, compute dtype = engine dtype)
    bnb-int8  bitsandbytes Linear8bitLt (LLM.int8(), outlier threshold 6.0)
    auto      for a GGUF model (--model FILE.gguf, or the embedded one) when the engine runs bf16
              on the CPU: int4 when every projection is stored in 4-bit blocks (then int4 serves
              exactly the file's codes), else `gguf`: each projection in the int4 kernel's form
              that holds the file's weights (engine.gguf_forms); any other model: none

Only the decoder projections are quantized; embeddings and norms stay in the engine dtype. The
bitsandbytes modes keep transformers' `BitsAndBytesConfig` defaults (lm_head and embeddings not
quantized, the settings below), so they hold the same numbers as
`from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`. LoRA runs on top in the
engine dtype, whatever the base's form.

bitsandbytes properties to know (transformers has them too):
  - bnb-int8 depends on batch mates: LLM.int8() computes in 16 bit every activation column with an
    outlier (|x| > threshold) in ANY row of the matmul, so a request's logits move with the other
    tokens in its step.
  - never call `state_dict()` on a CPU nf4 model after its first forward: in bitsandbytes 0.50
    `Linear4bit._save_to_state_dict` un-packs the CPU layout without restoring absmax's layout.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from loramux.engine.gguf_blocks import INT4_KINDS
from loramux.engine.linear import DenseLinear, Int4Linear, Int8Linear, quantize_int4

MODES = ("auto", "none", "int4", "int8", "bnb-nf4", "bnb-int8")
GGUF_MODES = ("int4", "gguf")        # modes built from a GGUF's own blocks when one is behind the model
CPU_ONLY = ("int4", "int8")          # ATen's weight-only kernels used here are CPU kernels
INT8_THRESHOLD = 6.0                 # transformers' BitsAndBytesConfig.llm_int8_threshold default
NF4_BLOCKSIZE = 64                   # bitsandbytes' default, what transformers uses

log = logging.getLogger("loramux.quantize")


def resolve_mode(mode: str, *, dtype: torch.dtype, device: torch.device,
                 gguf_kinds: Callable[[], frozenset[str]] | None = None) -> str:
    """`auto` -> the mode to run; a CPU-only mode on another device is refused. `gguf_kinds`: reads
    the stored types of a GGUF model's projections, called only when they decide (None: no GGUF)."""
    if mode == "auto":
        if gguf_kinds is None or dtype != torch.bfloat16 or device.type != "cpu":
            return "none"
        return "int4" if gguf_kinds() <= set(INT4_KINDS) else "gguf"
    if mode in CPU_ONLY and device.type != "cpu":
        raise ValueError(f"--quantize {mode} runs ATen's CPU kernels; on {device.type} use bnb-nf4 or bnb-int8")
    return mode


def make_projection(mode: str, weight: torch.Tensor, dtype: torch.dtype) -> nn.Module:
    """A projection module holding `weight` (d_out, d_in) in `mode`'s form."""
    if mode == "none":
        return DenseLinear(weight.to(dtype))
    if mode == "int4":
        return Int4Linear.from_codes(*quantize_int4(weight))
    if mode == "int8":
        return Int8Linear(weight)
    if mode in ("bnb-nf4", "bnb-int8"):
        return _bnb(mode, weight.to(dtype), dtype)
    raise ValueError(f"quantize must be one of {MODES}, got {mode!r}")


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


@torch.no_grad()
def _bnb(mode: str, weight: torch.Tensor, compute_dtype: torch.dtype) -> nn.Module:
    bnb = _import_bnb()
    d_out, d_in = weight.shape
    with torch.device("meta"):
        if mode == "bnb-int8":
            q = bnb.nn.Linear8bitLt(d_in, d_out, bias=False, has_fp16_weights=False, threshold=INT8_THRESHOLD)
        else:
            q = bnb.nn.Linear4bit(d_in, d_out, bias=False, compute_dtype=compute_dtype, compress_statistics=False,
                                  quant_type="nf4", quant_storage=torch.uint8)
    if mode == "bnb-int8":
        # Int8Params quantizes (via fp16, row-wise absmax) when moved from CPU to a real device.
        q.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=False).to(weight.device)
    else:
        # Params4bit quantizes on its first move to a real device; blocks of 64 never straddle rows
        # here (d_in % 64 == 0), so a fused q|k|v weight holds exactly the per-projection blocks.
        q.weight = bnb.nn.Params4bit(weight.to("cpu"), requires_grad=False, blocksize=NF4_BLOCKSIZE,
                                     compress_statistics=False, quant_type="nf4", quant_storage=torch.uint8,
                                     module=q).to(weight.device)
        q.quant_state = q.weight.quant_state
    q.requires_grad_(False)
    q.eval()
    # One tiny forward: int8 moves its weight into the matmul state and nf4 repacks for the CPU
    # kernel here, once, outside inference mode and before memory is reported.
    q(torch.zeros(1, d_in, device=weight.device, dtype=compute_dtype))
    return q


@torch.no_grad()
def dequantize_projection(proj: nn.Module) -> torch.Tensor:
    """float32 (d_out, d_in): the weight a projection of any resident form multiplies by, as it holds
    it (for DoRA's weight norm, which peft also takes of the dequantized weight)."""
    if hasattr(proj, "dequantized"):                      # engine.linear modules
        return proj.dequantized()
    bnb = _import_bnb()
    weight = proj.weight
    if isinstance(proj, bnb.nn.Linear8bitLt):             # LLM.int8(): int8 rows, one absmax each
        scb = proj.state.SCB if proj.state.SCB is not None else weight.SCB
        return bnb.functional.int8_vectorwise_dequant(weight.data, scb).float()
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        return _dequantize_nf4_cpu_packed(weight.data, state)
    return bnb.functional.dequantize_4bit(weight.data, state).float()


def _dequantize_nf4_cpu_packed(packed: torch.Tensor, state) -> torch.Tensor:
    """nf4 weights in the layout bitsandbytes (0.50) repacks them to for its AVX512-BF16 CPU kernel
    (`_convert_weight_packed_for_cpu`): (N, K / 2) bytes in blocks of 32 rows, low nibbles the first
    16 rows' codes... as its inverse reads them, and absmax (K / blocksize, N) in bf16. bnb's own
    `dequantize_4bit` reads this layout as the original one and returns garbage (so does peft's
    DoRA on such a base). tests/test_dora_quantized.py checks this against the kernel's output."""
    N, K = state.shape
    block_n = 32
    nibbles = packed.reshape(-1, block_n)
    codes = torch.cat([nibbles & 0xF, nibbles >> 4], dim=-1)                         # (N K / 64, 64)
    codes = codes.reshape(N // block_n, K // 2, block_n, 2).transpose(1, 2).reshape(N, K)
    values = state.code.float()[codes.long()]                                         # (N, K)
    absmax = state.absmax.float().T                                                   # (N, K / blocksize)
    return (values.reshape(N, -1, state.blocksize) * absmax.unsqueeze(-1)).reshape(N, K)


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
    weight shared with its matmul state, an int4 projection's dense copy), scales included."""
    storages: dict[int, int] = {}
    for module in model.modules():
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False), *_quant_tensors(module)]
        for t in tensors:
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())
