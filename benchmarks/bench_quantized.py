"""Quantized resident base: memory, decode throughput and perplexity for none / int8 / nf4, one run.

    python -m benchmarks.bench_quantized [--dtype bfloat16] [--tokens 64] [--batches 1 32] [--threads 2]
                                         [--window 512] [--decode-tokens 256]

For each mode the engine loads the embedded model with `EngineConfig(quantize=mode)` and reports:
  weight bytes   resident base-model bytes as the server reports them (`LLMEngine.weight_bytes`:
                 packed weights + their scales + the full-precision embeddings/lm_head and norms)
  tok/s          decode throughput, exactly `--tokens` new tokens per sequence (EOS ignored), the
                 continuous-batching step loop of `bench_engine`
  perplexity     on benchmarks/data/ppl.txt (the opening of Pride and Prejudice, public domain),
                 two ways through the engine's model:
                 prefill  the whole text in non-overlapping windows of `--window` tokens, each
                          window one prefill (how prompts are processed);
                 decode   its first `--decode-tokens` tokens teacher-forced one token per step with
                          the KV cache, batch 1 (how generated tokens are computed).
                 They differ for int8 only: LLM.int8() computes in 16 bit every activation column
                 with an outlier in ANY row of the matmul, so a 512-token prefill is nearly full
                 precision while a one-token decode step is mostly int8.
                 What matters is the change from `none`, not the absolute value.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.bench_engine import bench_loramux, make_prompts
from benchmarks.common import write_results
from loramux.engine.config import EngineConfig
from loramux.engine.llm_engine import LLMEngine
from loramux.engine.model_source import resolve_model
from loramux.engine.sampling_params import SamplingParams

MODES = ("none", "int4", "int8", "bnb-nf4", "bnb-int8")
TEXT = Path(__file__).resolve().parent / "data" / "ppl.txt"


@torch.inference_mode()
def perplexity(engine: LLMEngine, text: str, window: int) -> tuple[float, int]:
    """exp(mean next-token NLL) over the text cut into non-overlapping windows; -> (ppl, tokens scored)."""
    ids = engine.tokenizer(text)["input_ids"]
    nll, scored = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window]
        if len(chunk) < 2:
            break
        seq = engine.add_request(f"ppl-{start}", chunk, SamplingParams(max_tokens=1, temperature=0))[0]
        batch = engine.scheduler.schedule()
        input_ids, ctx, _ = engine.runner.prepare(batch)
        logits = engine.model(input_ids, ctx, None)                              # (T, vocab) float32
        engine.abort(seq.request_id)
        nll += F.cross_entropy(logits[:-1], input_ids[1:], reduction="sum").item()
        scored += len(chunk) - 1
    return math.exp(nll / scored), scored


@torch.inference_mode()
def decode_perplexity(engine: LLMEngine, text: str, n: int) -> tuple[float, int]:
    """Teacher-forced decode: prefill the first token, then feed the text's tokens one per step."""
    ids = engine.tokenizer(text)["input_ids"][:n]
    seq = engine.add_request("ppl-decode", ids[:1], SamplingParams(max_tokens=len(ids), temperature=0))[0]
    nll = 0.0
    for target in ids[1:]:
        logits = engine.runner.run(engine.scheduler.schedule())[0]
        nll -= torch.log_softmax(logits, -1)[target].item()
        seq.output_token_ids.append(target)             # the next step decodes the true token
    engine.abort(seq.request_id)
    return math.exp(nll / (len(ids) - 1)), len(ids) - 1


def run(dtype: str = "bfloat16", tokens: int = 64, batches: tuple[int, ...] = (1, 32), window: int = 512,
        decode_tokens: int = 256, modes: tuple[str, ...] = MODES) -> dict:
    torch.manual_seed(0)
    model_dir = resolve_model(None)
    text = TEXT.read_text()
    rows = []
    for mode in modes:
        t0 = time.perf_counter()
        engine = LLMEngine(EngineConfig(model_dir, dtype=dtype, quantize=mode, kv_cache_bytes=256 << 20,
                                        max_num_batched_tokens=max(window, 80)))   # a window per step
        row = {"quantize": mode, "load_s": round(time.perf_counter() - t0, 1), "weight_bytes": engine.weight_bytes,
               "weight_mib": round(engine.weight_bytes / 2**20, 1)}
        ppl, scored = perplexity(engine, text, window)
        ppl_decode, decoded = decode_perplexity(engine, text, decode_tokens)
        row.update(ppl_prefill=round(ppl, 3), ppl_prefill_tokens=scored, ppl_decode=round(ppl_decode, 3),
                   ppl_decode_tokens=decoded)
        for b in batches:
            row[f"tok_s_batch{b}"] = round(bench_loramux(engine, make_prompts(engine.tokenizer, b), tokens), 1)
        rows.append(row)
        print(row, flush=True)
        del engine
    base = next((r for r in rows if r["quantize"] == "none"), None)
    if base is not None:
        for r in rows:
            r["weight_vs_none"] = round(r["weight_bytes"] / base["weight_bytes"], 3)
            r["ppl_prefill_vs_none"] = round(r["ppl_prefill"] / base["ppl_prefill"], 3)
            r["ppl_decode_vs_none"] = round(r["ppl_decode"] / base["ppl_decode"], 3)
    return {"dtype": dtype, "new_tokens": tokens, "batches": list(batches), "ppl_text": str(TEXT.name),
            "ppl_window": window, "ppl_decode_tokens": decode_tokens, "load_average_after": [round(x, 2) for x in os.getloadavg()], "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args.dtype, args.tokens, tuple(args.batches), args.window, args.decode_tokens)
    result["threads"] = args.threads
    print(write_results("quantized", result, "python -m benchmarks.bench_quantized " +
                        f"--dtype {args.dtype} --tokens {args.tokens} --batches {' '.join(map(str, args.batches))} "
                        f"--window {args.window} --decode-tokens {args.decode_tokens} --threads {args.threads}"))


if __name__ == "__main__":
    main()
