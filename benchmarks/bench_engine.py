"""Engine decode throughput vs transformers `generate`, same model, dtype and machine, one run.

    python -m benchmarks.bench_engine [--dtype bfloat16] [--tokens 64] [--batches 1 8 32]

Each side generates exactly `--tokens` new tokens per sequence (EOS ignored). transformers runs a
static left-padded batch; loramux runs its continuous-batching step loop.
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM

from benchmarks.common import write_results
from loramux.engine.config import EngineConfig
from loramux.engine.llm_engine import LLMEngine
from loramux.engine.model_source import resolve_model
from loramux.engine.sampling_params import SamplingParams

TOPICS = ["the sea", "a city at night", "mountains", "an old library", "the first snow", "a robot", "autumn",
          "a lighthouse"]


def make_prompts(tokenizer, n: int) -> list[list[int]]:
    return [tokenizer(f"Write a short story about {TOPICS[i % len(TOPICS)]} (#{i}).")["input_ids"] for i in range(n)]


def bench_loramux(engine: LLMEngine, prompts: list[list[int]], tokens: int) -> float:
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    engine.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0))          # warm-up
    t0 = time.perf_counter()
    seqs = engine.generate(prompts, params)
    dt = time.perf_counter() - t0
    assert all(len(s.output_token_ids) == tokens for s in seqs)
    return len(prompts) * tokens / dt


def bench_hf(model, tokenizer, prompts: list[list[int]], tokens: int) -> float:
    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
    with torch.inference_mode():
        model.generate(**tokenizer.pad({"input_ids": prompts[:1]}, return_tensors="pt"), max_new_tokens=4,
                       do_sample=False)
        t0 = time.perf_counter()
        out = model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or 0)
        dt = time.perf_counter() - t0
    assert out.shape[1] - batch["input_ids"].shape[1] == tokens
    return len(prompts) * tokens / dt


def run(dtype: str = "bfloat16", tokens: int = 64, batches: tuple[int, ...] = (1, 8, 32)) -> dict:
    torch.manual_seed(0)
    model_dir = resolve_model(None)
    engine = LLMEngine(EngineConfig(model_dir, dtype=dtype, kv_cache_bytes=256 << 20))
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=engine.dtype).eval()
    rows = []
    for b in batches:
        prompts = make_prompts(engine.tokenizer, b)
        ours = bench_loramux(engine, prompts, tokens)
        theirs = bench_hf(hf, engine.tokenizer, prompts, tokens)
        rows.append({"batch": b, "loramux_tok_s": round(ours, 1), "transformers_tok_s": round(theirs, 1),
                     "ratio": round(ours / theirs, 2)})
        print(rows[-1], flush=True)
    return {"dtype": dtype, "new_tokens": tokens, "rows": rows,
            "goal": "ratio >= 1.0 at batch 1 and > 1.0 at batch 32"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    args = ap.parse_args()
    torch.set_num_threads(2)
    result = run(args.dtype, args.tokens, tuple(args.batches))
    print(write_results(f"engine_{args.dtype}", result, "python -m benchmarks.bench_engine " +
                        f"--dtype {args.dtype} --tokens {args.tokens} --batches {' '.join(map(str, args.batches))}"))


if __name__ == "__main__":
    main()
