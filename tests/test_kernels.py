"""Batched LoRA ops against the float64 per-token reference.

The torch CPU path runs the full grid (dtype x rank x hidden size x tokens x adapter mix); the
Triton kernels run a chosen subset through Triton's interpreter on CPU tensors (each interpreted
launch costs 10-500 ms), plus a compile-only check that they lower to cubin for a real GPU.
Inputs are random and poisoned where the ops must not look: NaN in x / t rows of base-model
tokens, in the weights and scales of slots no token uses, and in y's columns outside the expanded
slice. Rows and columns the ops must not touch are compared bit for bit.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from loramux.kernels import ops as kernels
from loramux.kernels import torch_ops
from loramux.kernels.mapping import LoraMapping
from loramux.kernels.reference import expand_ref, shrink_ref

pytestmark = pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
ROOT = Path(__file__).resolve().parents[1]
TOL = {  # vs float64; the inputs are already in the dtype, so this is accumulation + output rounding
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.float16: {"atol": 3e-3, "rtol": 3e-3},
    torch.bfloat16: {"atol": 2.5e-2, "rtol": 2.5e-2},
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RANKS = [1, 8, 16, 64]
HIDDEN = [100, 576, 1536]
TOKENS = [1, 7, 32, 128]
MIXES = ["distinct", "uniform", "zipf", "runs", "one", "none", "interleaved"]
Y_OFFSET, Y_PAD = 5, 3


def make_slots(mix: str, T: int, S: int, gen: torch.Generator) -> torch.Tensor:
    """(T,) slot per token for an adapter-popularity pattern; S slots exist in the stacks."""
    if mix == "distinct":  # every token its own adapter (decode across many tenants)
        return torch.randperm(S, generator=gen)[:T]
    if mix == "uniform":
        return torch.randint(0, S, (T,), generator=gen)
    if mix == "zipf":  # a few adapters hot, a long tail
        p = 1.0 / torch.arange(1, S + 1, dtype=torch.float64) ** 1.5
        return torch.multinomial(p, T, replacement=True, generator=gen)
    if mix == "runs":  # prefill: contiguous sequences, one adapter each, one of them base-only
        bounds = sorted(torch.randint(0, T + 1, (3,), generator=gen).tolist())
        owners = [3, -1, 0, S - 1]
        return torch.tensor([owners[sum(i >= b for b in bounds)] for i in range(T)])
    if mix == "one":
        return torch.full((T,), S // 2)
    if mix == "none":
        return torch.full((T,), -1)
    if mix == "interleaved":  # base-model tokens between adapter tokens
        s = torch.randint(0, 3, (T,), generator=gen) * 4 + 1
        return torch.where(torch.arange(T) % 3 == 1, -1, s)
    raise ValueError(mix)


def make_case(dtype, r, d, T, mix, seed=0, stack_dtype=None, d_out=None, rows=True):
    """Random inputs for one shrink + expand, poisoned where the ops must not read or write.
    ``rows``: stacks in the registry's row-major layout (A over (S, d, r), B over (S, r, d_out)
    storage), else plain contiguous (S, r, d) and (S, d_out, r) tensors."""
    gen = torch.Generator().manual_seed(seed)
    d_out = d_out or d
    S = T + 2 if mix == "distinct" else 12
    stack_dtype = stack_dtype or dtype
    slots = make_slots(mix, T, S, gen)
    base, unused = slots < 0, torch.ones(S, dtype=torch.bool)
    unused[slots[~base]] = False
    x = torch.randn(T, d, generator=gen)  # (T, d)
    x[base] = float("nan")
    A = torch.randn(S, r, d, generator=gen) / d**0.5  # (S, r, d): t ~ N(0, 1)
    B = torch.randn(S, d_out, r, generator=gen) / r**0.5  # (S, d_out, r)
    scale = torch.rand(S, generator=gen) + 0.5  # (S,) float32
    A[unused], B[unused], scale[unused] = float("nan"), float("nan"), float("nan")
    if rows:
        A, B = A.transpose(1, 2).contiguous().transpose(1, 2), B.transpose(1, 2).contiguous().transpose(1, 2)
    t = torch.randn(T, r, generator=gen)  # expand's input, independent of shrink
    t[base] = float("nan")
    y = torch.randn(T, Y_OFFSET + d_out + Y_PAD, generator=gen)
    y[:, :Y_OFFSET] = y[:, Y_OFFSET + d_out:] = float("nan")  # columns outside the slice
    return {"x": x.to(dtype), "A": A.to(stack_dtype), "B": B.to(stack_dtype), "scale": scale, "slots": slots,
            "t": t.to(dtype), "y": y.to(dtype), "base": base, "d_out": d_out}


def _poison_heap(*shape, dtype):
    """Best effort: leave a freed NaN block of this size for the op's next allocation to reuse."""
    del_me = torch.full(shape, float("nan"), dtype=dtype)
    del del_me


def check_shrink(t: torch.Tensor, c: dict) -> None:
    T, r = c["x"].shape[0], c["A"].shape[1]
    assert t.shape == (T, r) and t.dtype == c["x"].dtype
    assert torch.equal(t[c["base"]].double(), torch.zeros(int(c["base"].sum()), r, dtype=torch.float64))
    ref = shrink_ref(c["x"], c["A"], c["slots"], c["scale"])
    torch.testing.assert_close(t.double()[~c["base"]], ref[~c["base"]], **TOL[t.dtype])


def check_expand(y: torch.Tensor, c: dict) -> None:
    """y after the op vs c['y'] before it: the LoRA rows of the slice match the reference, every
    other element is bit-identical."""
    before, d_out = c["y"], c["d_out"]
    ref = expand_ref(c["t"], c["B"], c["slots"], before, Y_OFFSET)
    lora, cols = ~c["base"], slice(Y_OFFSET, Y_OFFSET + d_out)
    torch.testing.assert_close(y.double()[lora, cols], ref[lora, cols], **TOL[y.dtype])
    bits = torch.int16 if y.element_size() == 2 else torch.int32
    touched = torch.zeros_like(y, dtype=torch.bool)
    touched[lora, cols] = True
    assert torch.equal(y.view(bits)[~touched], before.view(bits)[~touched])


def run_ops(shrink, expand, c, mapping):
    _poison_heap(*c["t"].shape, dtype=c["t"].dtype)
    t = shrink(c["x"], c["A"], mapping, c["scale"])
    check_shrink(t, c)
    y = c["y"].clone()
    expand(c["t"], c["B"], mapping, y, Y_OFFSET)
    check_expand(y, c)


# --- the torch CPU path: the full grid --------------------------------------------------------

@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("d", HIDDEN)
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_path_matches_reference(dtype, r, d, T, mix):
    c = make_case(dtype, r, d, T, mix, seed=zlib.crc32(f"{r}-{d}-{T}-{mix}".encode()))
    run_ops(kernels.lora_shrink, kernels.lora_expand, c, LoraMapping.from_slots(c["slots"]))


@pytest.mark.parametrize("how", ["bagged", "segments", "single"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_torch_strategy_matches_reference(dtype, how):
    """_pick chooses by batch and layout; each strategy must be right wherever it is chosen."""
    c = make_case(dtype, 16, 576, 32, "one" if how == "single" else "zipf", seed=3, rows=how != "segments")
    m = LoraMapping.from_slots(c["slots"])
    assert torch_ops._pick(m, c["A"]) == how and torch_ops._pick(m, c["B"]) == how
    run_ops(lambda x, A, m_, s: torch_ops._shrink(x, A, m_, s, how),
            lambda t, B, m_, y, o: torch_ops._expand(t, B, m_, y, o, how), c, m)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mix", ["distinct", "runs", "one"])
def test_float32_stacks_with_16bit_activations(dtype, mix):
    """float32 stacks with bf16/fp16 activations (accepted, not the server's layout); t and y stay 16-bit."""
    c = make_case(dtype, 16, 576, 32, mix, seed=5, stack_dtype=torch.float32)
    run_ops(kernels.lora_shrink, kernels.lora_expand, c, LoraMapping.from_slots(c["slots"]))


@pytest.mark.parametrize("rows", [True, False], ids=["rows", "dense"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rank_trimmed_stack_views(dtype, rows):
    """A[:, :r_used] and B[:, :, :r_used] are strided views of r_max stacks; whatever lies beyond
    r_used (here random values, not zeros) must not matter."""
    c = make_case(dtype, 64, 576, 32, "uniform", seed=6, rows=rows)
    c["A"], c["B"], c["t"] = c["A"][:, :16], c["B"][:, :, :16], c["t"][:, :16].contiguous()
    assert not c["A"].is_contiguous() and not c["B"].is_contiguous()
    run_ops(kernels.lora_shrink, kernels.lora_expand, c, LoraMapping.from_slots(c["slots"]))


def test_bagged_reads_only_the_rows_of_its_stack():
    """Row-major stacks that are views into a larger buffer, at an offset: the bagged path must read
    them in place when the whole rows fit in storage, and fall back when they do not."""
    gen = torch.Generator().manual_seed(11)
    S, d, r, T = 6, 40, 8, 9
    slots = torch.tensor([0, 5, -1, 3, 5, 1, -1, 2, 4])
    m = LoraMapping.from_slots(slots)
    x, scale = torch.randn(T, d, generator=gen).bfloat16(), torch.rand(S, generator=gen) + 0.5
    buf = torch.randn(S, d, r + 4, generator=gen).bfloat16()
    inner = buf[:, :, 2:2 + r].transpose(1, 2)  # rows of r + 4, starting 2 in: the last row overruns
    tail = buf[:, :, :r].transpose(1, 2)        # rows start at 0: fit
    assert torch_ops._pick(m, tail) == "bagged" and torch_ops._pick(m, inner) == "segments"
    for A in (inner, tail):
        t = kernels.lora_shrink(x, A, m, scale)
        torch.testing.assert_close(t.double(), shrink_ref(x, A, slots, scale), **TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_scale_none_means_one(dtype):
    """scale=None (the registry folds each adapter's scale into B) is a scale of 1 for every slot."""
    c = make_case(dtype, 8, 100, 7, "interleaved", seed=13)
    m = LoraMapping.from_slots(c["slots"])
    t = kernels.lora_shrink(c["x"], c["A"], m, None)
    ref = shrink_ref(c["x"], c["A"], c["slots"], None)
    torch.testing.assert_close(t.double()[~c["base"]], ref[~c["base"]], **TOL[dtype])
    assert not t[c["base"]].any()


def test_fused_projection_slices():
    """q/k/v expanded into one y at their offsets: each slice gets its own adapter delta only."""
    gen = torch.Generator().manual_seed(8)
    T, r, widths = 16, 8, (64, 16, 16)
    slots = torch.tensor([0, 1, -1, 2] * 4)
    m = LoraMapping.from_slots(slots)
    t = torch.randn(T, r, generator=gen)
    Bs = [torch.randn(3, w, r, generator=gen) for w in widths]
    y = torch.randn(T, sum(widths), generator=gen)
    expected, offset = y.double().clone(), 0
    for B in Bs:
        expected = expand_ref(t, B, slots, expected, offset)
        kernels.lora_expand(t, B, m, y, offset)
        offset += B.shape[1]
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)


def test_raw_slot_tensor_is_accepted():
    c = make_case(torch.float32, 8, 100, 7, "interleaved", seed=9)
    run_ops(kernels.lora_shrink, kernels.lora_expand, c, c["slots"])


# --- the mapping ------------------------------------------------------------------------------

def test_mapping_groups_tokens_by_slot():
    m = LoraMapping.from_slots(torch.tensor([2, -1, 0, 2, 5, -1, 0, 2]))
    assert m.order.tolist() == [2, 6, 0, 3, 7, 4]  # stable within a slot
    assert m.sorted_slots.tolist() == [0, 0, 2, 2, 2, 5]
    assert (m.seg_slots_host, m.seg_starts_host, m.seg_lens_host) == ((0, 2, 5), (0, 2, 5), (2, 3, 1))
    assert m.seg_slots.tolist() == [0, 2, 5] and m.seg_lens.tolist() == [2, 3, 1]
    assert (m.num_tokens, m.num_lora_tokens, m.max_seg_len, m.max_slot) == (8, 6, 3, 5)
    assert m.any_lora and not m.all_lora and m.single_slot is None
    assert m.lora_tokens.tolist() == [0, 2, 3, 4, 6, 7]  # token order
    assert m.table_slots.tolist() == [2, 0, 0, 2, 5, 0, 0, 2]  # base tokens read slot 0, which is in use
    indices, offsets = m.bags(10, 2)  # rows 10 * slot + (0, 1); base tokens get empty bags
    assert indices.tolist() == [20, 21, 0, 1, 20, 21, 50, 51, 0, 1, 20, 21]
    assert offsets.tolist() == [0, 2, 2, 4, 6, 8, 8, 10]


def test_mapping_flags():
    assert not LoraMapping.from_slots(torch.full((4,), -1)).any_lora
    assert not LoraMapping.from_slots(torch.empty(0, dtype=torch.long)).any_lora
    assert LoraMapping.from_slots(torch.full((4,), 3)).single_slot == 3
    assert LoraMapping.from_slots(torch.tensor([3, -1])).single_slot is None
    assert LoraMapping.from_slots(torch.arange(8)).decode  # 1 token per adapter: gathered
    assert not LoraMapping.from_slots(torch.zeros(64, dtype=torch.long)).decode  # 64 per adapter
    assert not LoraMapping.from_slots(torch.arange(8), decode=False).decode


def test_mapping_and_ops_reject_bad_input():
    with pytest.raises(ValueError, match=">= -1"):
        LoraMapping.from_slots(torch.tensor([0, -2]))
    with pytest.raises(TypeError):
        LoraMapping.from_slots(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="1-D"):
        LoraMapping.from_slots(torch.zeros(2, 2, dtype=torch.long))
    x, A, scale = torch.randn(4, 8), torch.randn(3, 2, 8), torch.ones(3)
    with pytest.raises(IndexError, match="out of range"):
        kernels.lora_shrink(x, A, torch.tensor([0, 1, 2, 3]), scale)
    with pytest.raises(ValueError, match="tokens"):
        kernels.lora_shrink(x, A, torch.tensor([0, 1, 2]), scale)
    with pytest.raises(TypeError, match="dtype"):
        kernels.lora_shrink(x.half(), A.bfloat16(), torch.tensor([0, 1, 2, 0]), scale)
    with pytest.raises(ValueError, match="does not match"):
        kernels.lora_shrink(torch.randn(4, 9), A, torch.tensor([0, 1, 2, 0]), scale)
    with pytest.raises(ValueError, match="columns"):
        kernels.lora_expand(torch.randn(4, 2), torch.randn(3, 8, 2), torch.tensor([0, 1, 2, 0]),
                            torch.randn(4, 10), y_offset=3)


def test_cpu_tensors_take_the_torch_path():
    assert kernels._ops(torch.zeros(1)) is torch_ops


# --- the Triton kernels, interpreted on CPU tensors --------------------------------------------

triton_ops = pytest.importorskip("loramux.kernels.triton_ops")

INTERPRETED = [  # (dtype, r, d, T, mix): every mix once, every dtype, rank and size somewhere
    *[(torch.float32, 16, 576, 32, mix) for mix in MIXES],
    (torch.bfloat16, 8, 100, 7, "zipf"),
    (torch.float16, 8, 100, 7, "interleaved"),
    (torch.bfloat16, 1, 576, 7, "uniform"),
    (torch.float16, 64, 576, 7, "distinct"),
    (torch.bfloat16, 16, 1536, 32, "runs"),
    (torch.float32, 8, 100, 128, "uniform"),
    (torch.float32, 1, 576, 1, "one"),
]


@pytest.mark.parametrize("variant", ["sgmv", "bgmv"])
@pytest.mark.parametrize("dtype,r,d,T,mix", INTERPRETED, ids=lambda v: str(v).replace("torch.", ""))
def test_triton_kernels_match_reference(dtype, r, d, T, mix, variant):
    c = make_case(dtype, r, d, T, mix, seed=11)
    m = LoraMapping.from_slots(c["slots"])
    run_ops(getattr(triton_ops, f"{variant}_shrink"), getattr(triton_ops, f"{variant}_expand"), c, m)


@pytest.mark.parametrize("decode", [True, False])
def test_triton_dispatch_by_mapping(decode):
    c = make_case(torch.bfloat16, 16, 100, 7, "uniform", seed=12)
    run_ops(triton_ops.lora_shrink, triton_ops.lora_expand, c,
            LoraMapping.from_slots(c["slots"], decode=decode))


def test_triton_small_blocks_and_split_k():
    """Many masked K / N / M iterations (blocks far below the sizes), and split-K atomics."""
    c = make_case(torch.float16, 8, 100, 40, "zipf", seed=13)
    m = LoraMapping.from_slots(c["slots"])
    run_ops(lambda *a: triton_ops.sgmv_shrink(*a, block_m=16, block_k=16),
            lambda *a: triton_ops.sgmv_expand(*a, block_m=16, block_n=16), c, m)
    run_ops(lambda *a: triton_ops.bgmv_shrink(*a, block_k=16, split_k=3),
            lambda *a: triton_ops.bgmv_expand(*a, block_n=16), c, m)


@pytest.mark.parametrize("variant", ["sgmv", "bgmv"])
def test_triton_float32_stacks_and_trimmed_views(variant):
    c = make_case(torch.bfloat16, 64, 100, 7, "distinct", seed=14, stack_dtype=torch.float32)
    c["A"], c["B"], c["t"] = c["A"][:, :8], c["B"][:, :, :8], c["t"][:, :8].contiguous()
    m = LoraMapping.from_slots(c["slots"])
    run_ops(getattr(triton_ops, f"{variant}_shrink"), getattr(triton_ops, f"{variant}_expand"), c, m)


def test_triton_under_the_interpret_env_var():
    """The conventional route (TRITON_INTERPRET=1 before triton is imported) runs the same kernels."""
    code = (
        "import torch, triton, loramux.kernels.triton_ops as K\n"
        "from loramux.kernels.reference import shrink_ref\n"
        "assert triton.knobs.runtime.interpret\n"
        "x, A = torch.randn(5, 100), torch.randn(4, 8, 100)\n"
        "slots, scale = torch.tensor([2, -1, 0, 2, 3]), torch.rand(4)\n"
        "for f in (K.sgmv_shrink, K.bgmv_shrink):\n"
        "    torch.testing.assert_close(f(x, A, slots, scale).double(), shrink_ref(x, A, slots, scale),"
        " atol=1e-4, rtol=1e-4)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def _ptxas_available() -> bool:
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists() or bool(
        shutil.which("ptxas"))


@pytest.mark.skipif(not _ptxas_available(), reason="no ptxas to compile for a GPU target")
@pytest.mark.parametrize("name", ["sgmv_shrink", "sgmv_expand", "bgmv_shrink", "bgmv_expand"])
def test_triton_kernels_compile_for_sm80(name):
    """No GPU here, but the kernels must lower to real sm_80 cubin (16-bit SGMV on tensor cores)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    kernel = getattr(triton_ops, f"{name}_kernel")
    consts = {"sgmv_shrink": {"BLOCK_M": 16, "BLOCK_R": 16, "BLOCK_K": 64, "UPCAST": False},
              "sgmv_expand": {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_R": 16, "UPCAST": False},
              "bgmv_shrink": {"BLOCK_R": 16, "BLOCK_K": 128, "SPLIT_K": 4},
              "bgmv_expand": {"BLOCK_N": 256, "BLOCK_R": 16}}[name]
    sig = {}
    for arg in kernel.jit.arg_names:
        if arg in consts:
            sig[arg] = "constexpr"
        elif arg == "scale_ptr" or (arg == "t_ptr" and consts.get("SPLIT_K", 1) > 1):
            sig[arg] = "*fp32"
        elif arg.endswith("_ptr"):
            sig[arg] = "*bf16" if arg in ("x_ptr", "a_ptr", "b_ptr", "t_ptr", "y_ptr") else "*i64"
        else:
            sig[arg] = "i32"
    compiled = compile(ASTSource(fn=kernel.jit, signature=sig, constexprs=consts),
                       target=GPUTarget("cuda", 80, 32))
    assert len(compiled.asm["cubin"]) > 1000
    if name.startswith("sgmv"):
        assert "mma.sync" in compiled.asm["ptx"]
