"""Chunked prefill over HTTP: what a long prompt's arrival does to the streams already decoding.

    python -m benchmarks.bench_chunked_prefill [--streams 31] [--prompt-tokens 1500] [--budgets 4096,80]
                                               [--trials 3] [--max-tokens 100]

For each `--max-num-batched-tokens` budget a server of its own (defaults otherwise: bf16, int4 where the
CPU has bf16, prefix caching on) serves `--streams` streamed completions (greedy, ignore_eos); once
each has 10 tokens, a `--prompt-tokens` prompt (token ids, unique per run so no cache helps) arrives.
Reported per budget: the streams' inter-token latencies (p50, p99, max) over their whole run and in
the arrival window (gaps ending between the long prompt's arrival and three p50s after its first
token), and that prompt's time to first token. 4096 holds the whole prompt: a step prefills it at once, as the scheduler did before chunking.
Runs alternate between budgets (trial 1 of each, then trial 2, ...) so a shared machine's load
drifts over all of them alike; the load average is recorded.
Goal (issue #17): p99 during the arrival <= 2x p50, max <= 3x.
`--streams 0`: an idle server, the long prompt's TTFT alone per budget (issue #26: the default budget
within 1.1x of one that holds the whole prompt); results in chunked_prefill_idle.json.
"""
from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common import write_results
from benchmarks.http_stream import LoadWatch, Stream, own_server, pct, stream_completion

STORY = "Chapter {i}. The lighthouse keeper climbed the stairs and"


def long_prompt(n: int, salt: int) -> list[int]:
    """`n` token ids of real text, led by the tokens of a note naming `salt`, so no run reuses another's
    cache (the note's first token alone is the same word for every salt)."""
    from transformers import AutoTokenizer

    from loramux.engine.model_source import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(None))
    text = (Path(__file__).parent / "data" / "ppl.txt").read_text()
    ids = tok(text)["input_ids"]
    ids = (ids * (n // len(ids) + 1))[:n]
    return (tok(f"Note {salt}:")["input_ids"] + ids)[:n]


async def one_run(url: str, streams: int, prompt: list[int], max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=limits, trust_env=False) as client:
        body = {"model": "SmolLM2-135M-Instruct", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        if streams == 0:                                   # idle: the prompt's TTFT alone
            arrival = await stream_completion(client, {**body, "prompt": prompt, "max_tokens": 1})
            if arrival.error:
                raise RuntimeError(arrival.error)
            return {"ttft_long_prompt_s": round(arrival.ttft, 3)}
        runs = [Stream(time.perf_counter()) for _ in range(streams)]
        tasks = [asyncio.create_task(stream_completion(client, {**body, "prompt": STORY.format(i=i)}, s))
                 for i, s in enumerate(runs)]
        while min(len(s.token_times) for s in runs) < 10:
            if any(t.done() for t in tasks):
                raise RuntimeError(f"a stream ended early: {[t.result().error for t in tasks if t.done()]}")
            await asyncio.sleep(0.02)
        arrival = await stream_completion(client, {**body, "prompt": prompt, "max_tokens": 1})
        await asyncio.gather(*tasks)
    if arrival.error or any(s.error for s in runs):
        raise RuntimeError(arrival.error or next(s.error for s in runs if s.error))
    steady = [g for s in runs for g in s.gaps()]
    # The window closes a few steps after the long prompt's first token: the streams' tokens of the step
    # that finished its prefill arrive just after it.
    end = arrival.token_times[0] + 3 * pct(steady)["p50"]
    after = [g for s in runs for g in s.gaps(arrival.sent, end)]
    return {"itl_whole_run_s": pct(steady), "itl_during_arrival_s": pct(after),
            "ttft_long_prompt_s": round(arrival.ttft, 3), "tokens_per_stream": [len(s.token_times) for s in runs][:3]}


def summarize(rows: list[dict]) -> dict:
    """Per run (the load drifts between runs), then the median and worst run: the arrival window's p99
    and max against its own p50 (the issue's goal), and against the whole run's p50 (mostly steps
    with no prompt to prefill: what a chunk costs the streams)."""
    def ratios(ref: str, key: str) -> list[float]:
        return sorted(r["itl_during_arrival_s"][key] / r[ref]["p50"] for r in rows)

    mid = len(rows) // 2
    if "itl_whole_run_s" not in rows[0]:                  # idle runs
        return {"ttft_long_prompt_s_median": sorted(r["ttft_long_prompt_s"] for r in rows)[mid]}
    out = {}
    for ref, name in (("itl_during_arrival_s", "window_p50"), ("itl_whole_run_s", "whole_run_p50")):
        p99, worst = ratios(ref, "p99"), ratios(ref, "max")
        out[f"over_{name}"] = {"p99_median": round(p99[mid], 2), "p99_worst": round(p99[-1], 2),
                               "max_median": round(worst[mid], 2), "max_worst": round(worst[-1], 2)}
    window = out["over_window_p50"]
    return {**out, "itl_p50_whole_run_s_median": sorted(r["itl_whole_run_s"]["p50"] for r in rows)[mid],
            "ttft_long_prompt_s_median": sorted(r["ttft_long_prompt_s"] for r in rows)[mid],
            "goal_met_every_run": window["p99_worst"] <= 2 and window["max_worst"] <= 3}


def run(streams: int, prompt_tokens: int, budgets: list[int], trials: int, max_tokens: int) -> dict:
    watch = LoadWatch()
    rows: dict[int, list[dict]] = {b: [] for b in budgets}
    with tempfile.TemporaryDirectory(prefix="loramux-chunk-") as tmp:
        for trial in range(trials):
            for budget in budgets:
                with own_server(Path(tmp) / f"{budget}-{trial}", "--max-num-batched-tokens", str(budget)) as url:
                    prompt = long_prompt(prompt_tokens, salt=1000 * trial + budget)
                    rows[budget].append(asyncio.run(one_run(url, streams, prompt, max_tokens)))
                watch.note()
                print(budget, trial, rows[budget][-1], flush=True)
    return {"streams": streams, "prompt_tokens": prompt_tokens, "max_tokens": max_tokens, "trials": trials,
            "by_budget": {str(b): {"summary": summarize(r), "runs": r} for b, r in rows.items()},
            "machine_load": watch.report()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=31)
    ap.add_argument("--prompt-tokens", type=int, default=1500)
    ap.add_argument("--budgets", default="4096,80", help="--max-num-batched-tokens values, comma-separated")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=100)
    args = ap.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    res = run(args.streams, args.prompt_tokens, budgets, args.trials, args.max_tokens)
    for b, r in res["by_budget"].items():
        print(b, r["summary"])
    if args.streams == 0:
        ttft = {b: r["summary"]["ttft_long_prompt_s_median"] for b, r in res["by_budget"].items()}
        res["ttft_over_first_budget"] = {b: round(t / ttft[str(budgets[0])], 3) for b, t in ttft.items()}
        print(res["ttft_over_first_budget"])
    print(write_results("chunked_prefill_idle" if args.streams == 0 else "chunked_prefill", res, f"python -m benchmarks.bench_chunked_prefill --streams {args.streams} "
                        f"--prompt-tokens {args.prompt_tokens} --budgets {args.budgets} --trials {args.trials} "
                        f"--max-tokens {args.max_tokens}"))


if __name__ == "__main__":
    main()
