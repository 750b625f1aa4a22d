"""Many adapters past the slots, over HTTP: time to first token when requests cycle over more
adapters than fit, against the same load with every adapter resident.

    python -m benchmarks.bench_adapter_cycling [--adapters 64] [--requests 64] [--max-tokens 16]

`--adapters` r=16 q,k,v,o LoRA adapters; `--requests` concurrent streamed requests (request i names
adapter i mod N), `--max-tokens` each, greedy. Servers of their own (defaults, `--max-lora-rank 16`):
  resident     `--max-loras N`: every adapter warmed into a slot before the measured load;
  budget       the default `--max-lora-memory-gb` (slots from bytes); adapters cold on disk: the
               server restarted after registering them, so each is read, checked and copied into a
               slot in the background while other requests run;
  slots8       `--max-loras 8`, cold as above: 8 distinct adapters per batch (the issue's setting);
  resident8    `--max-loras 8`, requests over 8 adapters only, warm (the issue's comparison).
Reported: TTFT p50 / p99 / max, the slowest request (nothing may starve: every request must finish),
wall time. Goal (issue #17): p50 <= 1.5x and p99 <= 3x of the all-resident run.
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

PROMPTS = ["Write a short note about the sea.", "List three colours.", "Describe a cat in one line.",
           "What is a good name for a boat?"]


def write_adapters(root: Path, n: int) -> list[Path]:
    from loramux.engine.model_source import resolve_model
    from loramux.engine.models.spec import ModelSpec
    from tests.adapter_factory import write_small_lora

    spec = ModelSpec.from_dir(resolve_model(None))
    return [write_small_lora(root / f"cy-{i:02d}", spec, seed=900 + i, r=16,
                             targets=("q_proj", "k_proj", "v_proj", "o_proj")) for i in range(n)]


async def register(url: str, folders: list[Path]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=600, trust_env=False) as client:
        for folder in folders:
            (await client.post("/v1/adapters", json={"id": folder.name, "path": str(folder)})).raise_for_status()


async def load(url: str, models: list[str], requests: int, max_tokens: int, warm: bool) -> list[Stream]:
    limits = httpx.Limits(max_connections=requests + 4)
    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=limits, trust_env=False) as client:
        def body(i: int) -> dict:
            return {"model": models[i % len(models)], "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True}
        if warm:                                           # every adapter into its slot, then measure
            await asyncio.gather(*(stream_completion(client, {**body(i), "max_tokens": 1}) for i in range(len(models))))
        streams = [Stream(time.perf_counter()) for _ in range(requests)]
        return await asyncio.gather(*(stream_completion(client, body(i), s) for i, s in enumerate(streams)))


def measure(tmp: Path, name: str, folders: list[Path], flags: tuple[str, ...], adapters: int, requests: int,
            max_tokens: int, warm: bool) -> dict:
    root = tmp / name
    base = ("--max-lora-rank", "16", "--allowed-root", str(folders[0].parent), *flags)
    with own_server(root, *base) as url:
        asyncio.run(register(url, folders))
        if warm:
            return report(asyncio.run(load(url, [f.name for f in folders[:adapters]], requests, max_tokens, True)))
    with own_server(root, *base) as url:                   # restarted: the adapters are on disk only
        return report(asyncio.run(load(url, [f.name for f in folders[:adapters]], requests, max_tokens, False)))


def report(streams: list[Stream]) -> dict:
    errors = [s.error for s in streams if s.error]
    ttft = [s.ttft for s in streams if s.ttft is not None]
    done = [s.token_times[-1] - s.sent for s in streams if s.token_times]
    return {"finished": len(streams) - len(errors), "errors": errors[:3], "ttft_s": pct(ttft, 3),
            "slowest_request_s": round(max(done), 3), "wall_s": round(max(done), 3)}


def run(adapters: int, requests: int, max_tokens: int) -> dict:
    watch = LoadWatch()
    runs = {}
    with tempfile.TemporaryDirectory(prefix="loramux-cycle-") as tmp:
        folders = write_adapters(Path(tmp) / "adapters", adapters)
        plan = [("resident", folders, ("--max-loras", str(adapters)), adapters, True),
                ("budget", folders, (), adapters, False),
                ("slots8", folders, ("--max-loras", "8"), adapters, False),
                ("resident8", folders[:8], ("--max-loras", "8"), 8, True)]
        for name, used, flags, n, warm in plan:
            runs[name] = measure(Path(tmp), name, used, flags, n, requests, max_tokens, warm)
            watch.note()
            print(name, runs[name], flush=True)
    ref = runs["resident"]["ttft_s"]
    ratios = {name: {"p50": round(r["ttft_s"]["p50"] / ref["p50"], 2), "p99": round(r["ttft_s"]["p99"] / ref["p99"], 2)}
              for name, r in runs.items()}
    b = ratios["budget"]
    return {"adapters": adapters, "requests": requests, "max_tokens": max_tokens, "runs": runs,
            "ttft_over_resident": ratios,
            "goal_met_budget": b["p50"] <= 1.5 and b["p99"] <= 3 and runs["budget"]["finished"] == requests,
            "machine_load": watch.report()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapters", type=int, default=64)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    res = run(args.adapters, args.requests, args.max_tokens)
    print({k: v for k, v in res.items() if k != "runs"})
    print(write_results("adapter_cycling", res, f"python -m benchmarks.bench_adapter_cycling --adapters {args.adapters} "
                        f"--requests {args.requests} --max-tokens {args.max_tokens}"))


if __name__ == "__main__":
    main()
