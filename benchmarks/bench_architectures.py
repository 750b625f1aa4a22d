"""Decode throughput per architecture, loramux vs transformers `generate`, same checkpoint, one run.

    python -m benchmarks.bench_architectures [--archs llama3 qwen2 ...] [--batches 1 32] [--tokens 32]
    python -m benchmarks.bench_architectures --llama-1b     # + a Llama-3.2-1B-shaped random checkpoint
    python -m benchmarks.bench_architectures --archs --llama-1b   # that one alone (its own results file)

Each architecture's small random checkpoint (tests/arch_checkpoints.py: 2 layers, hidden 64, the real
49k vocabulary) measures per-step overhead more than arithmetic; `--llama-1b` adds a random
checkpoint of Llama-3.2-1B's shape (hidden 2048, 16 layers, 32/8 heads, intermediate 8192, vocab
128256, bf16 on disk) so a figure exists at a size people serve. Both sides run bf16, loramux in its
default `--quantize auto` (none: these checkpoints have no GGUF behind them). Best of `--repeats`,
interleaved; the results file records the machine's load.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from benchmarks.bench_engine import bench_hf, bench_loramux, make_prompts
from benchmarks.common import write_results
from loramux.engine.config import EngineConfig
from loramux.engine.llm_engine import LLMEngine
from loramux.engine.model_source import resolve_model
from tests.arch_checkpoints import ARCHS, write_arch_checkpoint

LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=8192, vocab_size=128256, max_position_embeddings=4096, tie_word_embeddings=True,
                rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                                     high_freq_factor=4.0, original_max_position_embeddings=2048))


def write_llama_1b(out: Path, tokenizer_from: Path) -> Path:
    """A random checkpoint of Llama-3.2-1B's shape (the embedded tokenizer: its ids fit the vocabulary)."""
    from transformers import AutoTokenizer, LlamaConfig

    model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_1B), dtype=torch.bfloat16)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(out)
    return out


def bench_one(path: Path, batches: tuple[int, ...], tokens: int, repeats: int) -> list[dict]:
    engine = LLMEngine(EngineConfig(path, dtype="bfloat16", kv_cache_bytes=256 << 20))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    rows = []
    for b in batches:
        prompts = make_prompts(engine.tokenizer, b)
        ours = theirs = 0.0
        for _ in range(repeats):
            ours = max(ours, bench_loramux(engine, prompts, tokens))
            theirs = max(theirs, bench_hf(hf, engine.tokenizer, prompts, tokens))
        rows.append({"batch": b, "loramux_tok_s": round(ours, 1), "transformers_tok_s": round(theirs, 1),
                     "loramux / transformers": round(ours / theirs, 2), "quantize": engine.quantize})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", nargs="*", default=list(ARCHS))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-1b", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer_from = resolve_model(None)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {a: write_arch_checkpoint(a, Path(tmp) / a, tokenizer_from) for a in args.archs}
        if args.llama_1b:
            paths["llama-3.2-1b-shape"] = write_llama_1b(Path(tmp) / "llama-1b", tokenizer_from)
        for name, path in paths.items():
            results[name] = bench_one(path, tuple(args.batches), args.tokens, args.repeats)
            print(name, results[name], flush=True)
    command = (f"python -m benchmarks.bench_architectures --archs {' '.join(args.archs)} --batches "
               f"{' '.join(map(str, args.batches))} --tokens {args.tokens} --repeats {args.repeats} "
               f"--threads {args.threads}" + (" --llama-1b" if args.llama_1b else ""))
    name = "architectures" + ("-llama-1b" if args.llama_1b and not args.archs else "")
    print(write_results(name, {"dtype": "bfloat16", "new_tokens": args.tokens, "results": results},
                        command))


if __name__ == "__main__":
    main()
