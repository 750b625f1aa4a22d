"""What --batch-invariant buys and costs: greedy requests alone vs together, and tokens/s together.

    python -m benchmarks.bench_batch_invariant [--dtype bfloat16] [--quantize int4] [--requests 32]
                                               [--tokens 24] [--rounds 2]

N greedy requests over the base model and 3 adapters (round robin), prompts of varied lengths.
For each mode (default, batch-invariant): every request run alone, then all together (continuous
batching: decodes of many adapters and chunked prefills in the same steps). Reported per mode: how
many requests' tokens differ between alone and together, the largest logprob gap of the chosen
tokens over their common prefix, and the together run's tokens/s (best of --rounds; the modes run
interleaved, so other jobs on a shared machine slow both alike). `uptime` is recorded.
"""
from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.bench_engine import make_prompts
from benchmarks.common import write_results
from loramux.engine.config import EngineConfig
from loramux.engine.cpu_threads import claim_intra_op_threads
from loramux.engine.llm_engine import LLMEngine
from loramux.engine.model_source import resolve_model
from loramux.engine.models.spec import ModelSpec
from loramux.engine.sampling_params import SamplingParams
from loramux.server.bootstrap import build_engine

ADAPTERS = 3


def make_engine(model_dir: Path, root: Path, dtype: str, quantize: str, invariant: bool) -> LLMEngine:
    from tests.adapter_factory import write_small_lora
    spec = ModelSpec.from_dir(model_dir)
    paths = {f"a{i}": write_small_lora(root / f"a{i}", spec, seed=i, r=8,
                                       targets=("q_proj", "k_proj", "v_proj", "o_proj"))
             for i in range(ADAPTERS)}
    econf = EngineConfig(model_dir, dtype=dtype, quantize=quantize, kv_cache_bytes=256 << 20, max_loras=ADAPTERS,
                         max_lora_rank=8, batch_invariant=invariant)
    return build_engine(econf, root / f"data-{invariant}", paths)[0]


def run(engine: LLMEngine, prompts: list[list[int]], adapters: list[str | None], tokens: int, together: bool):
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True, logprobs=0)
    t0 = time.perf_counter()
    if together:
        seqs = engine.generate(prompts, params, adapters)
    else:
        seqs = [engine.generate([p], params, [a])[0] for p, a in zip(prompts, adapters)]
    return seqs, time.perf_counter() - t0


def compare(alone, together) -> tuple[int, float]:
    differ, gap = 0, 0.0
    for a, b in zip(alone, together):
        differ += a.output_token_ids != b.output_token_ids
        for ta, tb, la, lb in zip(a.output_token_ids, b.output_token_ids, a.output_logprobs, b.output_logprobs):
            if ta != tb:
                break
            gap = max(gap, abs(la.logprob - lb.logprob))
    return differ, gap


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantize", default="int4")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    claim_intra_op_threads()
    model_dir = resolve_model(None)
    results: dict = {"load_before": subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout.strip()}
    with tempfile.TemporaryDirectory() as tmp:
        engines = {inv: make_engine(model_dir, Path(tmp), args.dtype, args.quantize, inv) for inv in (False, True)}
        prompts = make_prompts(engines[False].tokenizer, args.requests)
        prompts = [p * (1 + i % 3) for i, p in enumerate(prompts)]          # 1x to 3x long
        adapters = [None if i % (ADAPTERS + 1) == 0 else f"a{i % (ADAPTERS + 1) - 1}" for i in range(args.requests)]
        for engine in engines.values():                                      # warm-up, adapters in slots
            run(engine, prompts[:ADAPTERS + 1], adapters[:ADAPTERS + 1], 2, True)
        best = {inv: float("inf") for inv in engines}
        alone = {inv: run(e, prompts, adapters, args.tokens, False)[0] for inv, e in engines.items()}
        for _ in range(args.rounds):
            for inv, engine in engines.items():
                together, dt = run(engine, prompts, adapters, args.tokens, True)
                best[inv] = min(best[inv], dt)
                differ, gap = compare(alone[inv], together)
                name = "batch_invariant" if inv else "default"
                results.setdefault(name, {}).update(differ=max(differ, results.get(name, {}).get("differ", 0)),
                                                    max_logprob_gap=gap)
        for inv in engines:
            name = "batch_invariant" if inv else "default"
            results[name]["tokens_per_s_together"] = round(args.requests * args.tokens / best[inv], 1)
    results["cost"] = round(results["default"]["tokens_per_s_together"]
                            / results["batch_invariant"]["tokens_per_s_together"], 3)
    results["load_after"] = subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout.strip()
    results.update(requests=args.requests, tokens=args.tokens, dtype=args.dtype, quantize=args.quantize)
    out = write_results(f"batch_invariant_{args.dtype}_{args.quantize}", results)
    print(out.read_text())


if __name__ == "__main__":
    main()
