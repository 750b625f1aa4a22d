"""Where one decode step's time goes: a wall-clock breakdown and torch.profiler's op table.

    python -m benchmarks.profile_step [--dtype bfloat16] [--quantize auto] [--batches 1 32] [--steps 20]

For each batch size, `B` sequences are prefilled and decoded to a 64-token context, then `--steps`
decode steps are timed part by part (scheduler, metadata, forward, sampling, detokenizing and
output bookkeeping) and once more under torch.profiler (ops by self CPU time). Results go to
benchmarks/results/profile_<dtype>_<quantize>.json, with the command and the machine's load.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_engine import make_prompts
from benchmarks.common import write_results
from loramux.engine.config import EngineConfig
from loramux.engine.llm_engine import LLMEngine
from loramux.engine.model_source import resolve_model
from loramux.engine.sampling_params import SamplingParams

PARTS = ("schedule", "prepare", "forward", "sample", "outputs")


def timed_step(engine: LLMEngine, acc: dict[str, float]) -> None:
    """engine.step(), its parts timed (the same calls, in the same order)."""
    t = [time.perf_counter()]
    batch = engine.scheduler.schedule()
    t.append(time.perf_counter())
    input_ids, ctx, rows = engine.runner.prepare(batch)
    t.append(time.perf_counter())
    logits = engine.model(input_ids, ctx, rows)
    for seq, end in zip(batch.prefills, batch.chunk_ends):
        seq.num_computed_tokens = end
    for seq in batch.decodes:
        seq.num_computed_tokens = seq.num_tokens
    t.append(time.perf_counter())
    seqs = batch.sampled
    tokens, lps = engine.sampler(logits, seqs)
    t.append(time.perf_counter())
    for seq, tok, lp in zip(seqs, tokens, lps):
        engine._append(seq, tok, lp)
    t.append(time.perf_counter())
    for name, a, b in zip(PARTS, t, t[1:]):
        acc[name] += b - a


def profile_batch(engine: LLMEngine, batch: int, steps: int) -> dict:
    prompts = make_prompts(engine.tokenizer, batch)
    params = SamplingParams(max_tokens=64 + 3 * steps, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"prof-{batch}-{i}", p, params)
    while min(len(s.output_token_ids) for s in engine.scheduler.running + list(engine.scheduler.waiting)) < 48:
        engine.step()
    acc = dict.fromkeys(PARTS, 0.0)
    for _ in range(steps):
        timed_step(engine, acc)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    for i in range(batch):
        engine.abort(f"prof-{batch}-{i}")
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops)
    step_ms = sum(acc.values()) / steps * 1e3
    return {
        "batch": batch, "step_ms": round(step_ms, 3), "tok_s": round(batch / step_ms * 1e3, 1),
        "parts_ms": {k: round(v / steps * 1e3, 3) for k, v in acc.items()},
        "ops_per_step": round(sum(e.count for e in ops) / steps),
        "top_ops": [{"op": e.key, "self_ms_per_step": round(e.self_cpu_time_total / steps / 1e3, 3),
                     "calls_per_step": round(e.count / steps, 1),
                     "share": round(e.self_cpu_time_total / total, 3)} for e in ops[:20]],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantize", default="auto")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="", help="suffix of the results file (e.g. 'before')")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = LLMEngine(EngineConfig(resolve_model(None), dtype=args.dtype, quantize=args.quantize,
                                    kv_cache_bytes=256 << 20))
    mode = getattr(engine, "quantize", args.quantize)
    rows = []
    for b in args.batches:
        rows.append(profile_batch(engine, b, args.steps))
        print({k: rows[-1][k] for k in ("batch", "step_ms", "tok_s", "parts_ms")}, flush=True)
    name = f"profile_{args.dtype}_{mode}" + (f"_{args.tag}" if args.tag else "")
    command = (f"python -m benchmarks.profile_step --dtype {args.dtype} --quantize {args.quantize} "
               f"--batches {' '.join(map(str, args.batches))} --steps {args.steps} --threads {args.threads}")
    print(write_results(name, {"dtype": args.dtype, "quantize": mode, "rows": rows}, command))


if __name__ == "__main__":
    main()
