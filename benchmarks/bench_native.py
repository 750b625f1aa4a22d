"""The native int8 x int4 kernel against ATen's int4 kernel and a bf16 GEMM, and engine decode with
each, one run on one machine.

    python -m benchmarks.bench_native [--rows 1 8 32] [--batches 1 32] [--tokens 32] [--threads 2]

Kernel rows: one projection of SmolLM2's 576 -> 1536 (gate/up-like) and 1536 -> 576 (down) shapes,
microseconds per call (best of 7 rounds), the native kernel on each path this CPU runs (its
activation quantization included), ATen's `_weight_int4pack_mm_for_cpu` on bf16 activations and
`F.linear` in bf16. Engine rows: `--quantize auto` (int4) decode tok/s with the native kernel, and
in a child process with LORAMUX_NATIVE=0 (ATen's kernels and their bf16 copies), with each one's
resident weight bytes against the bf16 (`none`) model's. Writes benchmarks/results/native.json
with the command, the CPU model and `uptime` (the machine is shared: read figures against the load).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.common import write_results
from loramux.engine import native_quant
from loramux.engine.linear import pack_int4, quantize_int4

SHAPES = {"576->1536": (1536, 576), "1536->576": (576, 1536)}       # name: (N out, K in)


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        lines = f.read().splitlines()
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    wanted = [f for f in flags if f.startswith(("avx512_vnni", "avx512vnni", "avx512_bf16", "amx", "avx_vnni"))
              or f in ("avx2", "avx512f")]
    return f"{name} ({' '.join(wanted)})"


def uptime() -> str:
    return subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout.strip()


def best_us(fn, calls: int = 30, rounds: int = 7) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return round(best * 1e6, 1)


def bench_kernels(rows: tuple[int, ...]) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for name, (N, K) in SHAPES.items():
        w = torch.randn(N, K, generator=gen) * 0.05
        codes, scale, zero = quantize_int4(w)
        forms = {"native": pack_int4(codes, scale, zero, native=True),
                 "aten": pack_int4(codes, scale, zero, native=False), "bf16": w.bfloat16()}
        for m in rows:
            row = {"shape": name, "rows": m, **time_one(torch.randn(m, K, generator=gen).bfloat16(), forms)}
            print(row, flush=True)
            out.append(row)
    return out


def time_one(x: torch.Tensor, forms: dict) -> dict:
    """Microseconds per call of each kernel on activations x (the native ones quantize x too)."""
    native, aten = forms["native"], forms["aten"]
    row = {}
    for p in range(native_quant.ops().best_path() + 1):
        if p == 0 and x.shape[0] > 8:
            continue                                    # the scalar fallback: correctness, not speed
        row[f"native_{native_quant.path_name(p)}_us"] = best_us(
            lambda p=p: native_quant.int4_mm(native_quant.quantize_rows(x, path=p), *native, path=p))
    row["aten_int4_us"] = best_us(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, aten[0], 32, aten[1]))
    row["bf16_linear_us"] = best_us(lambda: F.linear(x, forms["bf16"]))
    best_native = min(v for k, v in row.items() if k.startswith("native_"))
    row["aten / native"] = round(row["aten_int4_us"] / best_native, 2)
    row["bf16 / native"] = round(row["bf16_linear_us"] / best_native, 2)
    return row


def bench_engine(batches: tuple[int, ...], tokens: int, repeats: int) -> dict:
    """Decode tok/s per batch for `--quantize auto` in this process's kernel mode, + resident bytes."""
    from benchmarks.bench_engine import bench_loramux, make_prompts
    from loramux.engine.config import EngineConfig
    from loramux.engine.llm_engine import LLMEngine
    from loramux.engine.model_source import resolve_model

    engine = LLMEngine(EngineConfig(resolve_model(None), dtype="bfloat16", quantize="auto", kv_cache_bytes=256 << 20))
    tok_s = {}
    for b in batches:
        prompts = make_prompts(engine.tokenizer, b)
        tok_s[b] = round(max(bench_loramux(engine, prompts, tokens) for _ in range(repeats)), 1)
    return {"quantize": engine.quantize, "native": native_quant.ops() is not None, "tok_s": tok_s,
            "weight_bytes": engine.weight_bytes}


def bf16_weight_bytes() -> int:
    from loramux.engine.config import EngineConfig
    from loramux.engine.llm_engine import LLMEngine
    from loramux.engine.model_source import resolve_model

    return LLMEngine(EngineConfig(resolve_model(None), dtype="bfloat16", quantize="none",
                                  kv_cache_bytes=16 << 20)).weight_bytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engine-only", action="store_true", help="print this process's engine row as JSON (child)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.engine_only:
        print(json.dumps(bench_engine(tuple(args.batches), args.tokens, args.repeats)))
        return
    if native_quant.ops() is None:
        raise SystemExit("the native kernel did not build here (see the log): nothing to compare")
    start = uptime()
    kernels = bench_kernels(tuple(args.rows))
    engine_native = bench_engine(tuple(args.batches), args.tokens, args.repeats)
    print(engine_native, flush=True)
    child = subprocess.run([sys.executable, "-m", "benchmarks.bench_native", "--engine-only", "--threads",
                            str(args.threads), "--tokens", str(args.tokens), "--repeats", str(args.repeats),
                            "--batches", *map(str, args.batches)], capture_output=True, text=True, check=True,
                           env={**os.environ, "LORAMUX_NATIVE": "0"})
    engine_aten = json.loads(child.stdout.strip().splitlines()[-1])
    print(engine_aten, flush=True)
    bf16 = bf16_weight_bytes()
    engine_rows = []
    for name, e in (("native", engine_native), ("aten", engine_aten)):
        engine_rows.append({"kernel": name, **{f"batch{b}_tok_s": v for b, v in e["tok_s"].items()},
                            "weight_mib": round(e["weight_bytes"] / 2**20, 1),
                            "weight_bytes / bf16 model": round(e["weight_bytes"] / bf16, 3)})
    command = (f"python -m benchmarks.bench_native --rows {' '.join(map(str, args.rows))} --batches "
               f"{' '.join(map(str, args.batches))} --tokens {args.tokens} --repeats {args.repeats} "
               f"--threads {args.threads}")
    print(write_results("native", {
        "cpu_model": cpu_model(), "native_path": native_quant.path_name(native_quant.ops().best_path()),
        "uptime_at_start": start, "uptime_at_end": uptime(), "threads": args.threads,
        "kernels_us": kernels, "engine": engine_rows, "bf16_model_weight_mib": round(bf16 / 2**20, 1)}, command))


if __name__ == "__main__":
    main()
