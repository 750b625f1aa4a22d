"""What the request surface costs the engine: decode tokens/s at batch 32 with every request
JSON-schema-constrained, with penalties on, and sampled, against plain greedy, in one run.

    python -m benchmarks.bench_surface [--batch 32] [--tokens 64] [--repeats 3]

Every configuration generates exactly `--tokens` tokens per sequence from the same prompts (EOS
ignored; the schema's minItems keeps each JSON open past that), so the ratios compare the same
work. Configurations run interleaved, best of `--repeats`, so a busy machine slows them alike; the
results file records the load. Goals (issue #16): constrained >= 0.9x, penalties >= 0.95x.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.bench_engine import make_prompts
from benchmarks.common import write_results
from loramux.engine.config import EngineConfig
from loramux.engine.llm_engine import LLMEngine
from loramux.engine.model_source import resolve_model
from loramux.engine.sampling_params import SamplingParams
from loramux.engine.structured import GrammarSpec, schema_text

# A record with a long list: the JSON cannot close before --tokens, and it exercises strings, numbers, enums.
SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string"},
    "status": {"enum": ["open", "closed", "pending"]},
    "entries": {"type": "array", "minItems": 200, "items": {"type": "object", "properties": {
        "name": {"type": "string"}, "score": {"type": "number"}}, "required": ["name", "score"]}}},
    "required": ["title", "status", "entries"]}


def configurations(engine: LLMEngine, tokens: int) -> dict[str, SamplingParams]:
    t0 = time.perf_counter()
    grammar = engine.grammars.compile(GrammarSpec("json_schema", schema_text(SCHEMA, strict=True)))
    print(f"schema compiled in {(time.perf_counter() - t0) * 1e3:.0f} ms (llguidance tokenizer included)")
    base = dict(max_tokens=tokens, ignore_eos=True)
    return {
        "greedy": SamplingParams(temperature=0, **base),
        "json_schema": SamplingParams(temperature=0, grammar=grammar, **base),
        "penalties": SamplingParams(temperature=0, frequency_penalty=0.5, presence_penalty=0.5,
                                    repetition_penalty=1.1, **base),
        "sampled": SamplingParams(temperature=0.8, top_p=0.9, top_k=50, **base),
        "sampled_penalties_bias": SamplingParams(temperature=0.8, top_p=0.9, frequency_penalty=0.5,
                                                 logit_bias={13: -5.0, 28: 2.0}, **base),
    }


def run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> float:
    t0 = time.perf_counter()
    seqs = engine.generate(prompts, params)
    dt = time.perf_counter() - t0
    assert all(len(s.output_token_ids) == params.max_tokens for s in seqs), [len(s.output_token_ids) for s in seqs]
    if params.grammar is not None:       # the constraint held: what came out is the start of a valid record
        text = engine.tokenizer.decode(seqs[0].output_token_ids, skip_special_tokens=True)
        assert text.lstrip().startswith("{"), text
    return len(prompts) * params.max_tokens / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    engine = LLMEngine(EngineConfig(resolve_model(None), dtype=args.dtype, max_num_seqs=max(args.batch, 8)))
    prompts = make_prompts(engine.tokenizer, args.batch)
    configs = configurations(engine, args.tokens)
    for params in configs.values():                      # warm-up: first masks, allocator, threads
        engine.generate(prompts[:4], SamplingParams(**{**params.__dict__, "max_tokens": 4}))
    best = {name: 0.0 for name in configs}
    for _ in range(args.repeats):
        for name, params in configs.items():
            best[name] = max(best[name], run(engine, prompts, params))
    ratios = {name: round(best[name] / best["greedy"], 3) for name in configs}
    for name in configs:
        print(f"{name:>24}: {best[name]:7.1f} tok/s  ({ratios[name]:.3f}x greedy)")
    out = write_results("surface", {"batch": args.batch, "tokens": args.tokens, "repeats": args.repeats,
                                    "dtype": args.dtype, "torch_threads": torch.get_num_threads(),
                                    "tok_per_s": {k: round(v, 1) for k, v in best.items()}, "ratio_to_greedy": ratios,
                                    "goals": {"json_schema": 0.9, "penalties": 0.95}, "schema": SCHEMA})
    print(json.dumps(ratios), "->", out)


if __name__ == "__main__":
    main()
