"""Load test: a mixed workload over real HTTP, every answer checked against the same request alone.

    python -m benchmarks.load_test [--url http://127.0.0.1:8000] [--admin-key KEY]
                                   [--requests 48] [--concurrency 8] [--adapters 16] [--time-limit 600]

Without --url it starts its own `loramux serve` on a free loopback port (float32, so greedy
answers are exact; 8 device slots for 16 adapters, so slots are swapped under load). With --url
the server must serve the embedded SmolLM2-135M (the adapters are written for its shapes) on
loopback; the adapters registered here are deleted at the end.

Workload (seeded): `--requests` requests, at most `--concurrency` in flight; each names one of
`--adapters` small LoRA adapters (uploaded first) or the base model, uses /v1/completions or
/v1/chat/completions, streams or not, has a short or a long (~200 token) prompt and 8-40 new
tokens, greedy with ignore_eos (so every request generates exactly max_tokens). Reports throughput,
p50/p99 time to first token and per-token latency (streaming requests), end-to-end latency, and
then replays every request alone, non-streaming: its text must equal the text it got under load.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np

from benchmarks.common import write_results

BASE = "SmolLM2-135M-Instruct"
SHORT = ["The capital of France is", "Write a haiku about the sea:", "def fibonacci(n):",
         "List three colours:", "My favourite food is", "The quick brown fox", "Explain gravity in one sentence.",
         "Once upon a time"]
LONG = ("The history of the lighthouse keeper's cottage begins in the winter of 1851, when a storm drove "
        "three fishing boats onto the rocks below the cliff. The villagers, who had long asked the harbour "
        "board for a light, raised the money themselves: the baker gave a week of bread, the blacksmith forged "
        "the iron stairs, and the schoolmaster's children painted the door a green that can still be seen under "
        "later coats. For ninety years the keepers lived there with their families, trimming wicks, winding the "
        "clockwork that turned the lens, and writing in a logbook that records every ship, every gale and "
        "every birth in the cottage. ")
SERVER_ARGS = ("--dtype", "float32", "--max-model-len", "512", "--kv-cache-gb", "0.25", "--max-num-seqs", "16",
               "--max-loras", "8", "--max-lora-rank", "8", "--max-queue", "256")


@dataclass
class Spec:
    """One request of the workload."""
    index: int
    endpoint: str                 # "completions" | "chat"
    model: str
    prompt: str
    max_tokens: int
    stream: bool

    def body(self, stream: bool | None = None) -> dict:
        stream = self.stream if stream is None else stream
        body = {"model": self.model, "max_tokens": self.max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        if self.endpoint == "chat":
            return {**body, "messages": [{"role": "user", "content": self.prompt}]}
        return {**body, "prompt": self.prompt}


@dataclass
class Result:
    index: int
    status: int
    text: str
    tokens: int
    seconds: float                # send to last byte
    ttft: float | None = None     # send to first text (streaming only)
    tpot: float | None = None     # mean gap between tokens after the first (streaming only)
    error: str | None = None


def workload(n: int, adapter_ids: list[str], seed: int) -> list[Spec]:
    rng = random.Random(seed)
    specs = []
    for i in range(n):
        model = BASE if i % 6 == 5 else adapter_ids[i % len(adapter_ids)]
        prompt = LONG + rng.choice(SHORT) if rng.random() < 1 / 3 else rng.choice(SHORT)
        specs.append(Spec(i, "chat" if rng.random() < 0.25 else "completions", model, prompt,
                          rng.randint(8, 40), stream=i % 2 == 0))
    rng.shuffle(specs)
    return specs


async def send(client: httpx.AsyncClient, spec: Spec, stream: bool | None = None) -> Result:
    path = "/v1/chat/completions" if spec.endpoint == "chat" else "/v1/completions"
    body = spec.body(stream)
    t0 = time.perf_counter()
    if not body["stream"]:
        r = await client.post(path, json=body)
        seconds = time.perf_counter() - t0
        if r.status_code != 200:
            return Result(spec.index, r.status_code, "", 0, seconds, error=r.text[:300])
        out = r.json()
        choice = out["choices"][0]
        text = choice["message"]["content"] if spec.endpoint == "chat" else choice["text"]
        return Result(spec.index, 200, text, out["usage"]["completion_tokens"], seconds)
    text, tokens, first, last, error = "", 0, None, None, None
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            return Result(spec.index, r.status_code, "", 0, time.perf_counter() - t0,
                          error=(await r.aread()).decode()[:300])
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                error = chunk["error"]["message"]
                continue
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                piece = choice["delta"].get("content") if spec.endpoint == "chat" else choice["text"]
                if piece:
                    last = time.perf_counter()
                    first = first or last
                    text += piece
    seconds = time.perf_counter() - t0
    ttft = first - t0 if first is not None else None
    tpot = (last - first) / (tokens - 1) if first is not None and tokens > 1 else None
    return Result(spec.index, 200 if error is None else 500, text, tokens, seconds, ttft, tpot, error)


async def run_load(url: str, specs: list[Spec], concurrency: int, time_limit: float) -> tuple[list[Result], float]:
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits, trust_env=False) as client:
        async def one(spec: Spec) -> Result:
            async with gate:
                return await send(client, spec)
        t0 = time.perf_counter()
        results = await asyncio.wait_for(asyncio.gather(*(one(s) for s in specs)), time_limit)
        return results, time.perf_counter() - t0


async def run_alone(url: str, specs: list[Spec]) -> list[Result]:
    async with httpx.AsyncClient(base_url=url, timeout=600, trust_env=False) as client:
        return [await send(client, spec, stream=False) for spec in specs]


def register_adapters(url: str, n: int, admin_key: str | None, root: Path) -> list[str]:
    """Write n small LoRA adapters for the embedded model and upload them (works without allowed roots)."""
    from loramux.engine.model_source import resolve_model
    from loramux.engine.models.spec import ModelSpec
    from tests.adapter_factory import write_small_lora

    spec = ModelSpec.from_dir(resolve_model(None))
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    ids = []
    for i in range(n):
        adapter_id = f"load-{i:02d}"
        folder = root / adapter_id
        write_small_lora(folder, spec, seed=500 + i)
        files = {name: (name, (folder / name).read_bytes())
                 for name in ("adapter_config.json", "adapter_model.safetensors")}
        r = httpx.post(f"{url}/v1/adapters", data={"id": adapter_id}, files=files, headers=headers, timeout=120,
                       trust_env=False)
        if r.status_code != 201:
            raise RuntimeError(f"registering {adapter_id}: {r.status_code} {r.text[:300]}")
        ids.append(adapter_id)
    return ids


def _pct(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    a = np.asarray(values)
    return {"n": len(values), "p50": round(float(np.percentile(a, 50)), 4), "p99": round(float(np.percentile(a, 99)), 4),
            "mean": round(float(a.mean()), 4)}


def _check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise SystemExit(f"load_test only drives servers on loopback, not {host!r}")


def run(url: str | None = None, admin_key: str | None = None, requests: int = 48, concurrency: int = 8,
        adapters: int = 16, time_limit: float = 600.0, seed: int = 0) -> dict:
    """Run the workload (starting a server unless `url`), then the alone-replay; return the report."""
    load_before = os.getloadavg()      # the machine may be shared: say how busy it was
    with tempfile.TemporaryDirectory(prefix="loramux-load-") as tmp:
        server = None
        if url is None:
            from tests.server_process import start_server
            server = start_server(Path(tmp), *SERVER_ARGS)
            url = server.url
        _check_loopback(url)
        ids: list[str] = []
        try:
            t0 = time.perf_counter()
            ids = register_adapters(url, adapters, admin_key, Path(tmp) / "adapters")
            register_s = time.perf_counter() - t0
            specs = workload(requests, ids, seed)
            asyncio.run(run_load(url, specs[:2], 2, time_limit))             # warm-up, not measured
            results, wall = asyncio.run(run_load(url, specs, concurrency, time_limit))
            alone = asyncio.run(run_alone(url, specs))
        finally:
            if server is not None:
                server.stop()
            elif ids:
                headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
                for adapter_id in ids:
                    httpx.delete(f"{url}/v1/adapters/{adapter_id}", headers=headers, trust_env=False)
    by_index = {s.index: s for s in specs}
    ok = [r for r in results if r.status == 200 and r.error is None]
    mismatches = [{"request": asdict(by_index[r.index]), "under_load": r.text, "alone": a.text}
                  for r, a in zip(results, alone) if r.text != a.text or r.status != 200 or a.status != 200]
    streamed = [r for r in ok if by_index[r.index].stream]
    tokens = sum(r.tokens for r in ok)
    alone_s = sum(a.seconds for a in alone)
    return {
        "server": "own: loramux serve " + " ".join(SERVER_ARGS) if server is not None else url,
        "workload": {"requests": requests, "concurrency": concurrency, "adapters": adapters, "seed": seed,
                     "streaming": sum(s.stream for s in specs), "chat": sum(s.endpoint == "chat" for s in specs),
                     "long_prompts": sum(s.prompt.startswith(LONG) for s in specs),
                     "base_model": sum(s.model == BASE for s in specs),
                     "new_tokens": sum(s.max_tokens for s in specs), "register_s": round(register_s, 2)},
        "results": {"ok": len(ok), "errors": [r.error or r.status for r in results if r not in ok],
                    "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1),
                    "requests_per_s": round(len(ok) / wall, 3),
                    "ttft_s": _pct([r.ttft for r in streamed if r.ttft is not None]),
                    "tpot_s": _pct([r.tpot for r in streamed if r.tpot is not None]),
                    "latency_s": _pct([r.seconds for r in ok])},
        "load_avg_1m": {"before": round(load_before[0], 1), "after": round(os.getloadavg()[0], 1)},
        "alone": {"tokens_per_s": round(sum(a.tokens for a in alone) / alone_s, 1), "wall_s": round(alone_s, 2)},
        "check": {"compared": len(results), "identical": len(results) - len(mismatches),
                  "mismatches": mismatches[:5]},
    }


def readme_text(res: dict) -> str:
    r, w = res["results"], res["workload"]
    return (f"{w['requests']} requests, {w['concurrency']} in flight, over {w['adapters']} LoRA adapters + the base "
            f"model ({w['streaming']} streaming, {w['chat']} chat, {w['long_prompts']} with a ~200-token prompt, "
            f"{w['new_tokens']} new tokens in all, greedy): {r['tokens_per_s']} tokens/s "
            f"({res['alone']['tokens_per_s']} one request at a time), time to first token p50 "
            f"{r['ttft_s'].get('p50', 0):.2f} s / p99 {r['ttft_s'].get('p99', 0):.2f} s, per-token latency p50 "
            f"{r['tpot_s'].get('p50', 0):.2f} s / p99 {r['tpot_s'].get('p99', 0):.2f} s; "
            f"{res['check']['identical']}/{res['check']['compared']} answers identical to the same request run "
            f"alone (1-minute load average {res['load_avg_1m']['before']}-{res['load_avg_1m']['after']} "
            f"on this shared 2-core machine).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default=None, help="a running loopback server (default: start one)")
    ap.add_argument("--admin-key", default=None)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--time-limit", type=float, default=600.0, help="seconds allowed for the loaded phase")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    res = run(args.url, args.admin_key, args.requests, args.concurrency, args.adapters, args.time_limit, args.seed)
    print(json.dumps({k: v for k, v in res.items() if k != "check"} | {"check": {
        k: v for k, v in res["check"].items() if k != "mismatches"}}, indent=2))
    print(readme_text(res))
    shown = {"--url": args.url, "--requests": args.requests, "--concurrency": args.concurrency,
             "--adapters": args.adapters, "--time-limit": args.time_limit, "--seed": args.seed}
    command = " ".join(["python -m benchmarks.load_test", *(f"{k} {v}" for k, v in shown.items() if v is not None)])
    print(write_results("load", {**res, "readme": readme_text(res)}, command))   # never the admin key
    if res["check"]["identical"] != res["check"]["compared"] or res["results"]["errors"]:
        raise SystemExit("some answers under load differ from the same request alone (see results/load.json)")


if __name__ == "__main__":
    main()
