"""The compiled Triton kernels on a real GPU: correctness against the float64 reference and timing.

Skipped without CUDA. Reuses the case builders and checks of test_kernels.py (pytest puts tests/
on sys.path). On a GPU machine: ``pytest -q tests/test_kernels_gpu.py -s`` (``-s`` shows
the timing table).
"""
from __future__ import annotations

import itertools

import pytest
import torch
from test_kernels import MIXES, TOL, Y_OFFSET, check_expand, check_shrink, make_case

HAS_CUDA = torch.cuda.is_available()
# The full grid only where it can run: without CUDA one representative case shows up as skipped.
GRID = [
    case for case in itertools.product(
        [torch.float32, torch.bfloat16, torch.float16], [1, 8, 16, 64], [100, 576, 1536, 4096],
        [1, 7, 32, 128, 1000], MIXES)
    if case[3] < 1000 or (case[2] <= 576 and case[4] != "distinct")  # bounds the float64 reference's work
] if HAS_CUDA else [(torch.bfloat16, 16, 576, 32, "zipf")]

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA"),
    pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION"),
]


def _cuda(c: dict) -> dict:
    return {k: (v.cuda() if isinstance(v, torch.Tensor) and k not in ("base",) else v) for k, v in c.items()}


def _run(shrink, expand, c_cpu: dict, decode: bool | None) -> None:
    from loramux.kernels import ops as kernels

    c = _cuda(c_cpu)
    m = kernels.LoraMapping.from_slots(c["slots"], decode=decode)
    t = shrink(c["x"], c["A"], m, c["scale"])
    check_shrink(t.cpu(), c_cpu)
    y = c["y"].clone()
    expand(c["t"], c["B"], m, y, Y_OFFSET)
    check_expand(y.cpu(), c_cpu)


@pytest.mark.parametrize("decode", [True, False], ids=["bgmv", "sgmv"])
@pytest.mark.parametrize("dtype,r,d,T,mix", GRID, ids=lambda v: str(v).replace("torch.", ""))
def test_compiled_kernels_match_reference(dtype, r, d, T, mix, decode):
    from loramux.kernels import ops as kernels

    _run(kernels.lora_shrink, kernels.lora_expand, make_case(dtype, r, d, T, mix, seed=T + d + r), decode)


def test_cuda_tensors_take_the_triton_path():
    from loramux.kernels import ops as kernels
    from loramux.kernels import triton_ops

    assert kernels._ops(torch.zeros(1, device="cuda")) is triton_ops


@pytest.mark.parametrize("split_k", [2, 4])
def test_split_k_shrink(split_k):
    from loramux.kernels import triton_ops

    c = _cuda(make_case(torch.bfloat16, 16, 4096, 32, "distinct", seed=1))
    t = triton_ops.bgmv_shrink(c["x"], c["A"], c["slots"], c["scale"], split_k=split_k)
    ref = triton_ops.bgmv_shrink(c["x"], c["A"], c["slots"], c["scale"])
    torch.testing.assert_close(t, ref, **TOL[torch.bfloat16])


def test_float32_stacks_with_bf16_activations():
    from loramux.kernels import ops as kernels

    for decode in (True, False):
        _run(kernels.lora_shrink, kernels.lora_expand,
             make_case(torch.bfloat16, 16, 576, 32, "zipf", seed=2, stack_dtype=torch.float32), decode)


def _bench_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100)


@pytest.mark.parametrize("d", [576, 4096])
def test_timing_mixed_vs_single_vs_base(d):
    """Punica's claim on a GPU: mixing 32 adapters costs about what one adapter costs, and the LoRA
    ops are small next to the base matmul. Loose bounds, printed numbers."""
    from loramux.kernels import ops as kernels

    torch.manual_seed(0)
    T, S, r, dt = 32, 32, 16, torch.bfloat16
    x = torch.randn(T, d, device="cuda", dtype=dt)
    W = torch.randn(d, d, device="cuda", dtype=dt) / d**0.5
    A = torch.randn(S, r, d, device="cuda", dtype=dt) / d**0.5
    B = torch.randn(S, d, r, device="cuda", dtype=dt) / r**0.5
    scale = torch.ones(S, device="cuda")
    y = torch.zeros(T, d, device="cuda", dtype=dt)
    maps = {"mixed": kernels.LoraMapping.from_slots(torch.randperm(S, device="cuda")),
            "single": kernels.LoraMapping.from_slots(torch.full((T,), 3, device="cuda"))}
    ms = {"base": _bench_ms(lambda: x @ W.T)}
    for name, m in maps.items():
        ms[name] = _bench_ms(lambda m=m: kernels.lora_expand(kernels.lora_shrink(x, A, m, scale), B, m, y))
    print(f"\nd={d} bf16 T=32 r=16: " + ", ".join(f"{k} {v * 1e3:.1f} us" for k, v in ms.items()))
    assert ms["mixed"] <= 3.0 * ms["single"]
    if d == 4096:
        assert ms["mixed"] <= 2.0 * ms["base"]
