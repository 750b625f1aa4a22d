"""Engine decode throughput vs transformers `generate` and llama.cpp, same model and machine, one run.

    python -m benchmarks.bench_engine [--modes auto none int8] [--tokens 64] [--batches 1 8 32]

Each side generates exactly `--tokens` new tokens per sequence (EOS ignored) from the same prompts.
loramux runs its continuous-batching step loop once per `--quantize` mode (bf16 engine);
transformers runs a static left-padded batch in bf16 on the dequantized checkpoint; llama.cpp
(llama-cpp-python, the `bench` extra) decodes the very GGUF the embedded model ships, batch 1
only (one sequence per context), with the same thread count. Columns are measured interleaved,
best of `--repeats`, so a busy machine slows them alike; the results file records the load.
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM

from benchmarks.common import write_results
from loramux.engine.config import EngineConfig
from loramux.engine.llm_engine import LLMEngine
from loramux.engine.model_source import find_embedded_gguf, resolve_model
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


def llama_cpp_runner(threads: int):
    """A function (prompts, tokens) -> tok/s on llama.cpp, or None without the `bench` extra."""
    try:
        from benchmarks.llama_cpp import llama_cpp_decode_tok_s
    except ImportError:
        return None
    gguf = find_embedded_gguf()
    return lambda prompts, tokens: llama_cpp_decode_tok_s(gguf, prompts, tokens, threads)


def run(modes: tuple[str, ...], tokens: int, batches: tuple[int, ...], repeats: int, threads: int) -> dict:
    torch.manual_seed(0)
    model_dir = resolve_model(None)
    engines = {m: LLMEngine(EngineConfig(model_dir, dtype="bfloat16", quantize=m, kv_cache_bytes=256 << 20))
               for m in modes}
    tokenizer = next(iter(engines.values())).tokenizer
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    llama = llama_cpp_runner(threads)
    rows = []
    for b in batches:
        prompts = make_prompts(tokenizer, b)
        best: dict[str, float] = {}
        for _ in range(repeats):
            for mode, engine in engines.items():
                best[mode] = max(best.get(mode, 0.0), bench_loramux(engine, prompts, tokens))
            best["transformers"] = max(best.get("transformers", 0.0), bench_hf(hf, tokenizer, prompts, tokens))
            if llama is not None and b == 1:
                best["llama.cpp"] = max(best.get("llama.cpp", 0.0), llama(prompts, tokens))
        row = {"batch": b, **{f"{k}_tok_s": round(v, 1) for k, v in best.items()}}
        for mode, engine in engines.items():
            label = f"{mode}={engine.quantize}" if mode == "auto" else mode
            row[f"{label} / transformers"] = round(best[mode] / best["transformers"], 2)
            if "llama.cpp" in best:
                row[f"{label} / llama.cpp"] = round(best[mode] / best["llama.cpp"], 2)
        rows.append(row)
        print(row, flush=True)
    return {"dtype": "bfloat16", "new_tokens": tokens, "threads": threads, "rows": rows,
            "goal": "default mode >= 1.0x llama.cpp at batch 1; >= 2x transformers (bf16) at batch 1; "
                    ">= 1.5x at batch 32"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", nargs="+", default=["auto", "none", "int8"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = run(tuple(args.modes), args.tokens, tuple(args.batches), args.repeats, args.threads)
    command = (f"python -m benchmarks.bench_engine --modes {' '.join(args.modes)} --tokens {args.tokens} "
               f"--batches {' '.join(map(str, args.batches))} --repeats {args.repeats} --threads {args.threads}")
    print(write_results("engine", result, command))


if __name__ == "__main__":
    main()
