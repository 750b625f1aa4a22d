"""Prefix caching keyed by adapter, over HTTP: a repeat request's time to first token, and exactness.

    python -m benchmarks.bench_prefix_cache [--adapters 32] [--system-tokens 500] [--repeats 3]

Two servers of their own (float32, so greedy answers must match exactly; `--max-lora-rank 16`):
prefix caching on (the default) and `--no-enable-prefix-caching`. Each registers `--adapters`
r=16 q,k,v,o LoRA adapters; adapter i has its own `--system-tokens` system prompt. One request at a
time: every adapter's first request, then `--repeats` more per adapter (same system prompt, another
question). Reported: time to first token of first and repeat requests on each server, the cache's hit
rate from /metrics, and whether every answer of the cached server equals the uncached one's.
Goal (issue #17): a repeat's time to first token >= 5x lower than the first's; outputs identical.
"""
from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common import write_results
from benchmarks.http_stream import LoadWatch, Stream, own_server, stream_completion

QUESTIONS = ["What is the first thing you do?", "Summarise the text in one line.", "Who is the keeper?",
             "Name one object in the story.", "What season is it?"]


def system_prompts(n: int, tokens: int) -> list[list[int]]:
    """`n` distinct system prompts of `tokens` tokens (real text, each its own slice and header)."""
    from transformers import AutoTokenizer

    from loramux.engine.model_source import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(None))
    text = tok((Path(__file__).parent / "data" / "ppl.txt").read_text())["input_ids"]
    out = []
    for i in range(n):
        head = tok(f"You are assistant number {i}. Answer from this text only.\n\n")["input_ids"]
        body = (text[37 * i:] + text)[:tokens - len(head)]
        out.append(head + body)
    return out


def write_adapters(root: Path, n: int) -> list[Path]:
    from loramux.engine.model_source import resolve_model
    from loramux.engine.models.spec import ModelSpec
    from tests.adapter_factory import write_small_lora

    spec = ModelSpec.from_dir(resolve_model(None))
    return [write_small_lora(root / f"pc-{i:02d}", spec, seed=700 + i, r=16,
                             targets=("q_proj", "k_proj", "v_proj", "o_proj")) for i in range(n)]


async def serve_workload(url: str, folders: list[Path], systems: list[list[int]], repeats: int,
                         max_tokens: int) -> tuple[list[dict], str]:
    async with httpx.AsyncClient(base_url=url, timeout=1800, trust_env=False) as client:
        for folder in folders:
            r = await client.post("/v1/adapters", json={"id": folder.name, "path": str(folder)})
            r.raise_for_status()
        from transformers import AutoTokenizer

        from loramux.engine.model_source import resolve_model

        tok = AutoTokenizer.from_pretrained(resolve_model(None))
        rows = []
        for k in range(repeats + 1):                        # round 0: every adapter's first request
            for folder, system in zip(folders, systems):
                prompt = system + tok("\nQuestion: " + QUESTIONS[k % len(QUESTIONS)] + "\nAnswer:")["input_ids"]
                body = {"model": folder.name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                        "ignore_eos": True}
                s = await stream_completion(client, body, Stream(time.perf_counter()))
                if s.error:
                    raise RuntimeError(s.error)
                rows.append({"adapter": folder.name, "round": k, "ttft_s": round(s.ttft, 4), "text": s.text})
        metrics = (await client.get("/metrics")).text
    return rows, metrics


def hit_rates(metrics: str) -> dict[str, float]:
    return {m: float(v) for m, v in re.findall(r'loramux_prefix_cache_hit_rate\{model="([^"]+)"\} (\S+)', metrics)}


def run(adapters: int, system_tokens: int, repeats: int, max_tokens: int) -> dict:
    watch = LoadWatch()
    systems = system_prompts(adapters, system_tokens)
    out = {}
    with tempfile.TemporaryDirectory(prefix="loramux-prefix-") as tmp:
        folders = write_adapters(Path(tmp) / "adapters", adapters)
        for name, flags in (("cache_on", ()), ("cache_off", ("--no-enable-prefix-caching",))):
            with own_server(Path(tmp) / name, "--dtype", "float32", "--max-lora-rank", "16", "--allowed-root",
                            str(Path(tmp) / "adapters"), *flags) as url:
                rows, metrics = asyncio.run(serve_workload(url, folders, systems, repeats, max_tokens))
            watch.note()
            first = [r["ttft_s"] for r in rows if r["round"] == 0]
            again = [r["ttft_s"] for r in rows if r["round"] > 0]
            rates = hit_rates(metrics)
            out[name] = {"ttft_first_s_median": statistics.median(first), "ttft_repeat_s_median": statistics.median(again),
                         "ttft_first_s_max": max(first), "ttft_repeat_s_max": max(again),
                         "first_over_repeat": round(statistics.median(first) / statistics.median(again), 1),
                         "hit_rate_median_over_adapters": statistics.median(rates.values()) if rates else None,
                         "rows": rows}
            print(name, {k: v for k, v in out[name].items() if k != "rows"}, flush=True)
    on, off = out["cache_on"]["rows"], out["cache_off"]["rows"]
    identical = sum(a["text"] == b["text"] for a, b in zip(on, off))
    summary = {"first_over_repeat_cached": out["cache_on"]["first_over_repeat"],
               "repeat_uncached_over_cached": round(out["cache_off"]["ttft_repeat_s_median"]
                                                    / out["cache_on"]["ttft_repeat_s_median"], 1),
               "outputs_identical": f"{identical}/{len(on)}",
               "goal_met": out["cache_on"]["first_over_repeat"] >= 5 and identical == len(on)}
    for r in (*on, *off):
        r["text"] = r["text"][:60]
    return {"adapters": adapters, "system_tokens": system_tokens, "repeats": repeats, "max_tokens": max_tokens,
            "summary": summary, **out, "machine_load": watch.report()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--system-tokens", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    res = run(args.adapters, args.system_tokens, args.repeats, args.max_tokens)
    print(res["summary"])
    print(write_results("prefix_cache", res, f"python -m benchmarks.bench_prefix_cache --adapters {args.adapters} "
                        f"--system-tokens {args.system_tokens} --repeats {args.repeats} --max-tokens {args.max_tokens}"))


if __name__ == "__main__":
    main()
