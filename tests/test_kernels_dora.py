"""The DoRA row scaling (`kernels.lora_scale_rows`) against the float64 per-token reference.

Same conventions as tests/test_kernels.py: the torch CPU path over the grid (dtype x width x
tokens x adapter mix), the Triton kernel through its interpreter on a subset, a compile-only
check for a real GPU. Poisoned where the op must not look: NaN factors in slots no token uses,
NaN in y's base-model rows and outside the scaled columns; what must stay untouched is compared
bit for bit.

Tolerance: y and the factors are exact in their dtypes, the product is formed in float32 and
rounded once to y's dtype, so it is within one unit of that rounding of the float64 product, on any
CPU: rtol = eps of y's dtype, and atol = its smallest subnormal, the unit of rounding there (fp16
products fall into that range now and then).
"""
from __future__ import annotations

import zlib

import pytest
import torch

from loramux.kernels import ops as kernels
from loramux.kernels import torch_ops
from loramux.kernels.mapping import LoraMapping
from loramux.kernels.reference import scale_rows_ref
from tests.test_kernels import DTYPES, MIXES, make_slots

pytestmark = pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
WIDTHS = [100, 576, 960, 3072]     # odd, hidden, fused q|k|v, fused gate|up of the embedded model
TOKENS = [1, 7, 32, 128]
OFFSET, PAD = 5, 3


def make_case(dtype, d, T, mix, seed=0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    S = T + 2 if mix == "distinct" else 12
    slots = make_slots(mix, T, S, gen)
    base = slots < 0
    used = torch.zeros(S, dtype=torch.bool)
    used[slots[~base]] = True
    factors = 1 + 0.2 * torch.randn(S, d, generator=gen)       # (S, d) float32, DoRA-sized factors
    factors[~used] = float("nan")
    factors[0] = 1.0                                             # slot 0: a plain LoRA adapter's row
    y = torch.randn(T, OFFSET + d + PAD, generator=gen) * 4
    y[:, :OFFSET] = y[:, OFFSET + d:] = float("nan")
    y[base] = float("nan")
    return {"y": y.to(dtype), "factors": factors, "slots": slots, "base": base, "d": d}


def check(y: torch.Tensor, c: dict) -> None:
    before, d = c["y"], c["d"]
    lora, cols = ~c["base"], slice(OFFSET, OFFSET + d)
    ref = scale_rows_ref(before, c["factors"], c["slots"], OFFSET)
    info = torch.finfo(y.dtype)
    torch.testing.assert_close(y.double()[lora, cols], ref[lora, cols], atol=info.tiny * info.eps, rtol=info.eps)
    bits = torch.int16 if y.element_size() == 2 else torch.int32
    touched = torch.zeros_like(y, dtype=torch.bool)
    touched[lora, cols] = True
    touched[c["slots"] == 0] = False                             # factor 1: bit-identical too
    assert torch.equal(y.view(bits)[~touched], before.view(bits)[~touched])


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_path_matches_reference(dtype, d, T, mix):
    c = make_case(dtype, d, T, mix, seed=zlib.crc32(f"{d}-{T}-{mix}".encode()))
    y = c["y"].clone()
    kernels.lora_scale_rows(y, c["factors"], LoraMapping.from_slots(c["slots"]), OFFSET)
    check(y, c)


def test_each_torch_form_is_taken_and_right():
    """single (one adapter), all_lora (gather), mixed (index_copy of the LoRA rows)."""
    for mix, flag in (("one", "single_slot"), ("uniform", "all_lora"), ("interleaved", None)):
        c = make_case(torch.bfloat16, 576, 32, mix, seed=4)
        m = LoraMapping.from_slots(c["slots"])
        assert flag is None or getattr(m, flag) not in (None, False)
        y = c["y"].clone()
        torch_ops.scale_rows(y, c["factors"], m, OFFSET)
        check(y, c)


def test_whole_fused_row_and_raw_slots():
    c = make_case(torch.float32, 960, 7, "zipf", seed=5)
    y, factors = c["y"][:, OFFSET:OFFSET + 960].contiguous(), c["factors"]
    ref = scale_rows_ref(y, factors, c["slots"])
    kernels.lora_scale_rows(y, factors, c["slots"])              # a raw (T,) slot tensor, offset 0
    torch.testing.assert_close(y.double(), ref, atol=0, rtol=torch.finfo(torch.float32).eps)


def test_bad_input_is_refused():
    y, f = torch.randn(4, 10), torch.ones(3, 8)
    slots = torch.tensor([0, 1, -1, 2])
    with pytest.raises(TypeError, match="float32"):
        kernels.lora_scale_rows(y, f.bfloat16(), slots)
    with pytest.raises(ValueError, match="columns"):
        kernels.lora_scale_rows(y, f, slots, y_offset=3)
    with pytest.raises(IndexError, match="out of range"):
        kernels.lora_scale_rows(y, f, torch.tensor([0, 1, 3, 2]))
    with pytest.raises(ValueError, match="tokens"):
        kernels.lora_scale_rows(y, f, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="2-D"):
        kernels.lora_scale_rows(y, torch.ones(8), slots)


# --- the Triton kernel, interpreted on CPU tensors ---------------------------------------------

triton_dora = pytest.importorskip("loramux.kernels.triton_dora")

INTERPRETED = [(torch.float32, 960, 32, mix) for mix in MIXES] + [
    (torch.bfloat16, 100, 7, "zipf"), (torch.float16, 576, 7, "interleaved"), (torch.bfloat16, 3072, 32, "runs"),
]


@pytest.mark.parametrize("dtype,d,T,mix", INTERPRETED, ids=lambda v: str(v).replace("torch.", ""))
def test_triton_kernel_matches_reference(dtype, d, T, mix):
    c = make_case(dtype, d, T, mix, seed=11)
    y = c["y"].clone()
    triton_dora.lora_scale_rows(y, c["factors"], LoraMapping.from_slots(c["slots"]), OFFSET)
    check(y, c)


def test_triton_small_blocks():
    """Many masked column blocks (a block far below the width)."""
    c = make_case(torch.float16, 100, 9, "uniform", seed=12)
    y = c["y"].clone()
    triton_dora.lora_scale_rows(y, c["factors"], LoraMapping.from_slots(c["slots"]), OFFSET, block_n=16)
    check(y, c)


def test_triton_kernel_compiles_for_sm80():
    """No GPU here, but the kernel must lower to real sm_80 cubin."""
    from tests.test_kernels import _ptxas_available

    if not _ptxas_available():
        pytest.skip("no ptxas to compile for a GPU target")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    kernel = triton_dora.scale_rows_kernel
    sig = {arg: ("constexpr" if arg == "BLOCK_N" else "*bf16" if arg == "y_ptr" else "*fp32" if arg == "f_ptr"
                 else "*i64" if arg.endswith("_ptr") else "i32") for arg in kernel.jit.arg_names}
    compiled = compile(ASTSource(fn=kernel.jit, signature=sig, constexprs={"BLOCK_N": 1024}),
                       target=GPUTarget("cuda", 80, 32))
    assert len(compiled.asm["cubin"]) > 1000
