"""Head-of-line blocking over HTTP: a short request that arrives while an idle server prefills a
long prompt in one step (issue #28 item 7: its TTFT <= 2x its TTFT on an idle server).

    python -m benchmarks.bench_head_of_line [--prompt-tokens 1872] [--delay 0.3] [--trials 5]

One server, default flags. Per trial: a 4-token request alone (its idle TTFT); the long prompt alone
(token ids, unique per trial so no cache helps); then the long prompt again (another salt) with the
short request sent `--delay` s after it. Reported: medians over the trials of the short request's
TTFT alone and during the prefill, their ratio (the goal), and what the arrival costs the long
prompt (its TTFT with the short request against alone: the yielded step's work is redone).
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

import httpx

from benchmarks.bench_chunked_prefill import long_prompt
from benchmarks.common import write_results
from benchmarks.http_stream import LoadWatch, own_server, stream_completion

BODY = {"model": "SmolLM2-135M-Instruct", "max_tokens": 1, "temperature": 0}
SHORT = "The sea is"            # 4 tokens with the embedded model's tokenizer


async def trial(url: str, prompt_tokens: int, delay: float, salt: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600, trust_env=False) as client:
        async def ttft(prompt: str | list[int]) -> float:
            s = await stream_completion(client, {**BODY, "prompt": prompt})
            if s.error:
                raise RuntimeError(s.error)
            return s.ttft

        short_alone = await ttft(SHORT)
        long_alone = await ttft(long_prompt(prompt_tokens, salt))
        long_task = asyncio.create_task(ttft(long_prompt(prompt_tokens, salt + 1)))
        await asyncio.sleep(delay)
        short_during = await ttft(SHORT)
        long_with_short = await long_task
    return {"short_alone_s": round(short_alone, 4), "short_during_prefill_s": round(short_during, 4),
            "long_alone_s": round(long_alone, 3), "long_with_short_s": round(long_with_short, 3)}


def run(prompt_tokens: int, delay: float, trials: int) -> dict:
    watch = LoadWatch()
    rows = []
    with tempfile.TemporaryDirectory(prefix="loramux-hol-") as tmp, own_server(Path(tmp) / "server") as url:
        asyncio.run(trial(url, 64, 0.0, salt=1))          # warm-up: first-request costs out of the way
        for i in range(trials):
            rows.append(asyncio.run(trial(url, prompt_tokens, delay, salt=10 * (i + 1))))
            watch.note()
            print(i, rows[-1], flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    ratio = med["short_during_prefill_s"] / med["short_alone_s"]
    return {"prompt_tokens": prompt_tokens, "delay_s": delay, "trials": trials, "runs": rows, "medians": med,
            "short_ttft_during_over_alone": round(ratio, 2),
            "long_ttft_with_short_over_alone": round(med["long_with_short_s"] / med["long_alone_s"], 3),
            "goal_met": ratio <= 2, "machine_load": watch.report()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt-tokens", type=int, default=1872)
    ap.add_argument("--delay", type=float, default=0.3)
    ap.add_argument("--trials", type=int, default=5)
    args = ap.parse_args()
    res = run(args.prompt_tokens, args.delay, args.trials)
    print({k: v for k, v in res.items() if k != "runs"})
    print(write_results("head_of_line", res, f"python -m benchmarks.bench_head_of_line --prompt-tokens "
                        f"{args.prompt_tokens} --delay {args.delay} --trials {args.trials}"))


if __name__ == "__main__":
    main()
