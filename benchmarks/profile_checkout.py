"""Where a decode step's time goes in any loramux checkout, old or new: `engine.step()` alone,
timed and under torch.profiler, at batch 1 and 32 (bf16, 64-token prompts' worth of context).

It touches only what every version has (EngineConfig, LLMEngine.add_request / step / abort), so
the same command profiles today's engine and one from before a change:

    git worktree add /tmp/before <commit>
    PYTHONPATH=/tmp/before python benchmarks/profile_checkout.py --package engine --tag before-<commit>
    python benchmarks/profile_checkout.py --tag after

(run as a script, so that the checkout on PYTHONPATH, not the working directory, provides `engine`).

(`benchmarks/profile_step.py` splits today's step into its parts.)
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

RESULTS = Path(__file__).resolve().parent / "results"


def _engine_modules(package: str):
    """The engine's modules: `loramux.engine`, or the top-level `engine` of checkouts before the package."""
    names = ("config", "llm_engine", "model_source")
    mods = [importlib.import_module(f"{package}.{n}") for n in names]
    params = next(importlib.import_module(f"{package}.{n}") for n in ("sampling_params", "sampling")
                  if importlib.util.find_spec(f"{package}.{n}"))
    return (*mods, params)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--package", default="loramux.engine", help="`engine` for checkouts before the loramux package")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    config, llm_engine, model_source, sampling = _engine_modules(args.package)
    engine = llm_engine.LLMEngine(config.EngineConfig(model_source.resolve_model(None), dtype="bfloat16",
                                                      kv_cache_bytes=256 << 20))
    prompt = engine.tokenizer("Write a short story about the sea. " * 8)["input_ids"][:64]
    rows = []
    for b in args.batches:
        params = sampling.SamplingParams(max_tokens=10 + 3 * args.steps, temperature=0, ignore_eos=True)
        for i in range(b):
            engine.add_request(f"p{b}-{i}", prompt, params)
        for _ in range(8):                       # prefill and a few decodes: warm
            engine.step()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        step_ms = (time.perf_counter() - t0) / args.steps * 1e3
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                engine.step()
        for i in range(b):
            engine.abort(f"p{b}-{i}")
        ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in ops)
        rows.append({"batch": b, "step_ms": round(step_ms, 2), "tok_s": round(b / step_ms * 1e3, 1),
                     "ops_per_step": round(sum(e.count for e in ops) / args.steps),
                     "top_ops": [{"op": e.key, "self_ms_per_step": round(e.self_cpu_time_total / args.steps / 1e3, 3),
                                  "share": round(e.self_cpu_time_total / total, 3)} for e in ops[:15]]})
        print({k: rows[-1][k] for k in ("batch", "step_ms", "tok_s", "ops_per_step")}, flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"profile_checkout_{args.tag}.json"
    out.write_text(json.dumps({
        "command": f"python benchmarks/profile_checkout.py --package {args.package} --tag {args.tag}"
                   + (" (PYTHONPATH=<that checkout>: see the docstring)" if args.package == "engine" else ""),
        "engine_module": llm_engine.__name__, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"), "load_avg_at_end": os.getloadavg(),
        "rows": rows}, indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    main()
