"""What the per-layer non-finite K/V check costs a decode step (issue #28: "check per step at the
cost you measure").

    python -m benchmarks.bench_kv_check [--dtype float32] [--batch 1 32]

engine.attention checks each layer's new K/V with one reduction (``isfinite(k.sum() + v.sum())``)
before writing it to the cache. Timed: that check alone on a decode step's K/V (T rows), times the
model's layers, against a whole decode step of T sequences on the real engine (best of --repeats).
`uptime` is recorded: the machine is shared.
"""
from __future__ import annotations

import argparse
import subprocess
import time

import torch

from benchmarks.common import write_results
from loramux.engine.config import EngineConfig
from loramux.engine.cpu_threads import claim_intra_op_threads
from loramux.engine.llm_engine import LLMEngine
from loramux.engine.model_source import resolve_model
from loramux.engine.sampling_params import SamplingParams


def check_seconds(T: int, nkv: int, hd: int, dtype: torch.dtype, repeats: int) -> float:
    k, v = torch.randn(T, nkv, hd).to(dtype), torch.randn(T, nkv, hd).to(dtype)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(100):
            bool(torch.isfinite(k.sum() + v.sum()))
        best = min(best, (time.perf_counter() - t0) / 100)
    return best


def step_seconds(engine: LLMEngine, T: int, repeats: int) -> float:
    """A decode step of T sequences 40 tokens in (best of `repeats`)."""
    prompt = engine.tokenizer("Write a short story about a lighthouse keeper.")["input_ids"]
    for i in range(T):
        engine.add_request(f"b{i}", prompt, SamplingParams(max_tokens=40 + repeats + 2, temperature=0,
                                                           ignore_eos=True))
    while any(not s.is_decoding for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    for _ in range(30):
        engine.step()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.step()
        best = min(best, time.perf_counter() - t0)
    for i in range(T):
        engine.abort(f"b{i}")
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    claim_intra_op_threads()
    load_before = subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout.strip()
    engine = LLMEngine(EngineConfig(resolve_model(None), dtype=args.dtype))
    spec = engine.spec
    rows = []
    for T in args.batch:
        check = check_seconds(T, spec.num_kv_heads, spec.head_dim, engine.dtype, args.repeats) * spec.num_layers
        step = step_seconds(engine, T, args.repeats)
        rows.append({"batch": T, "check_per_step_us": round(check * 1e6, 1), "decode_step_ms": round(step * 1e3, 2),
                     "check_share": round(check / step, 4)})
    out = write_results(f"kv_check_{args.dtype}", {
        "rows": rows, "dtype": args.dtype, "quantize": engine.quantize, "load_before": load_before,
        "load_after": subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout.strip()})
    print(out.read_text())


if __name__ == "__main__":
    main()
