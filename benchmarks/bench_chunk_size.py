"""Step time vs prompt-chunk size beside running decodes: what sets `--max-num-batched-tokens`.

    python -m benchmarks.bench_chunk_size [--streams 31] [--chunks 16,32,48,64,96,128] [--pairs 10]

The engine alone (default settings: bf16, int4 where the CPU has bf16), `--streams` sequences
decoding, a 1500-token prompt being prefilled. Steps alternate: the decodes plus a C-token chunk of
the prompt, then the decodes alone (the budget set per step), so each ratio compares two steps taken
back to back and a shared machine's load drifts out of it. The running streams' inter-token latency
is the step time: the ratio is what a chunk does to their p99 against their p50.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import write_results
from loramux.engine.config import EngineConfig
from loramux.engine.llm_engine import LLMEngine
from loramux.engine.model_source import resolve_model
from loramux.engine.sampling_params import SamplingParams


def run(streams: int, chunks: list[int], pairs: int) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    eng = LLMEngine(EngineConfig(resolve_model(None), max_num_seqs=64, max_num_batched_tokens=4096,
                                 enable_prefix_caching=False))
    tok = eng.tokenizer
    ids = tok((Path(__file__).parent / "data" / "ppl.txt").read_text())["input_ids"]
    long_ids = (ids * 2)[:1500]
    params = SamplingParams(max_tokens=100_000, temperature=0, ignore_eos=True)
    for i in range(streams):
        eng.add_request(f"s{i}", tok(f"Story number {i}: once upon a time")["input_ids"], params)
    for _ in range(3):
        eng.step()

    def timed(budget: int) -> float:
        eng.scheduler.max_num_batched_tokens = budget
        t0 = time.perf_counter()
        eng.step()
        return time.perf_counter() - t0

    rows = []
    load = [os.getloadavg()[0]]
    for c in chunks:
        seq = eng.add_request(f"long-{c}", [c] + long_ids[1:], SamplingParams(max_tokens=1, temperature=0))[0]
        with_chunk, alone = [], []
        for _ in range(pairs):
            with_chunk.append(timed(streams + c))
            alone.append(timed(streams))
        eng.abort(seq.request_id)
        ratios = [a / b for a, b in zip(with_chunk, alone)]
        rows.append({"chunk": c, "budget": streams + c, "step_with_chunk_ms": round(statistics.median(with_chunk) * 1e3),
                     "step_decodes_only_ms": round(statistics.median(alone) * 1e3),
                     "ratio_median": round(statistics.median(ratios), 2), "ratio_max": round(max(ratios), 2)})
        load.append(os.getloadavg()[0])
        print(rows[-1], flush=True)
    return {"streams": streams, "dtype": eng.config.dtype, "quantize": eng.quantize, "pairs": pairs, "rows": rows,
            "load_avg_1m_samples": [round(x, 2) for x in load]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=31)
    ap.add_argument("--chunks", default="16,32,48,64,96,128")
    ap.add_argument("--pairs", type=int, default=10)
    args = ap.parse_args()
    res = run(args.streams, [int(c) for c in args.chunks.split(",")], args.pairs)
    print(write_results("chunk_size", res, f"python -m benchmarks.bench_chunk_size --streams {args.streams} "
                        f"--chunks {args.chunks} --pairs {args.pairs}"))


if __name__ == "__main__":
    main()
