"""Serving over HTTP: `loramux serve` against llama.cpp's `llama-server`, one client script for both.

    python -m benchmarks.http_bench [--server both|loramux|llama] [--clients 1 32] [--adapter-clients 32]
                                    [--adapters 4] [--rounds 2] [--tokens 64] [--threads 2]
    python -m benchmarks.http_bench --url http://127.0.0.1:8080 [--kind auto|loramux|llama] ...

C concurrent clients, each streaming `--rounds` /v1/completions requests one after another: a
distinct prompt each, `--tokens` greedy new tokens with EOS ignored (`ignore_eos`, which both
servers accept; llama.cpp masks end-of-generation tokens, loramux does not stop on them), so every
request yields exactly that many tokens on either server. Workloads: each of `--clients` on the
base model, and `--adapter-clients` clients over `--adapters` distinct LoRA adapters (client c
names adapter c mod N). Reported per workload: aggregate new tokens/s, time to first token
p50/p99, inter-token latency (gaps between streamed chunks) p50/p99/max.

Without --url it starts each server in turn on a free loopback port with the same adapters: N real
peft LoRA adapters of the embedded SmolLM2-135M (r=16 on q/k/v/o, B ~ N(0, 0.05): each changes
the greedy answer, which the warm-up checks), registered with loramux as
peft folders and converted to GGUF for llama.cpp by its own convert_lora_to_gguf.py.
- loramux: `loramux serve --adapters DIR`, its defaults otherwise; adapters named in `model`.
- llama.cpp: `llama-server -m <embedded GGUF> -t THREADS -np max(clients)` with every adapter
  loaded at scale 0 (`--lora-scaled FILE:0`); a request picks its adapter with llama-server's
  per-request field `"lora": [{"id": k, "scale": 1.0}]`. llama-server decodes in one step only the
  slots whose LoRA set equals that of the first busy slot, so requests for different adapters are
  served group after group, never in one batch. Requests send `"cache_prompt": false` and every
  prompt is distinct (so loramux's prefix cache never hits either): both prefill every prompt.
Results go to benchmarks/results/http.json. With --url it drives a server you started (adapters:
for loramux the first N non-base models of /v1/models, for llama-server the first N of
/lora-adapters) and only prints.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from benchmarks.common import write_results

TOPICS = ["the sea", "a city at night", "mountains", "an old library", "the first snow", "a robot", "autumn",
          "a lighthouse"]
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def prompt(i: int) -> str:
    return f"Write a short story about {TOPICS[i % len(TOPICS)]} (#{i})."


@dataclass
class Target:
    """A running server and how a request names the base model or adapter k."""
    kind: str                                          # "loramux" | "llama"
    url: str
    base_model: str
    adapters: list[dict] = field(default_factory=list)  # request fields selecting adapter k

    def body(self, text: str, new_tokens: int, adapter: int | None) -> dict:
        body = {"model": self.base_model, "prompt": text, "max_tokens": new_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        if self.kind == "llama":
            body["cache_prompt"] = False
        return body | (self.adapters[adapter] if adapter is not None else {})


@dataclass
class Stream:
    text: str
    tokens: int
    ttft: float                # send to first text
    gaps: list[float]          # between successive chunks with text


async def stream_one(client: httpx.AsyncClient, body: dict) -> Stream:
    t0 = time.perf_counter()
    text, times, tokens = "", [], None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            piece = "".join(c.get("text") or "" for c in chunk.get("choices", []))
            if piece:
                times.append(time.perf_counter())
                text += piece
    if tokens != body["max_tokens"] or not times:
        raise RuntimeError(f"asked for {body['max_tokens']} tokens, got {tokens} ({len(times)} text chunks)")
    return Stream(text, tokens, times[0] - t0, list(np.diff(times)))


def _pct(values: list[float], scale: float = 1.0, digits: int = 3) -> dict:
    if not values:   # one-token answers have no gaps
        return {}
    a = np.asarray(values) * scale
    return {"p50": round(float(np.percentile(a, 50)), digits), "p99": round(float(np.percentile(a, 99)), digits),
            "max": round(float(a.max()), digits)}


async def run_workload(target: Target, clients: int, adapters: int, rounds: int, new_tokens: int) -> dict:
    """`clients` concurrent streaming clients, `rounds` requests each; adapters=0: the base model."""
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(base_url=target.url, timeout=600, limits=limits, trust_env=False) as client:
        async def one_client(c: int) -> list[Stream]:
            adapter = c % adapters if adapters else None
            return [await stream_one(client, target.body(prompt(c * rounds + r), new_tokens, adapter))
                    for r in range(rounds)]
        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(one_client(c) for c in range(clients)))
        wall = time.perf_counter() - t0
    streams = [s for cs in per_client for s in cs]
    tokens = sum(s.tokens for s in streams)
    return {"clients": clients, "adapters": adapters, "requests": len(streams), "new_tokens": tokens,
            "wall_s": round(wall, 2), "tok_s": round(tokens / wall, 1),
            "ttft_s": _pct([s.ttft for s in streams]),
            "itl_ms": _pct([g for s in streams for g in s.gaps], 1000, 1)}


async def warm_up(target: Target, n_adapters: int) -> None:
    """One short request on the base model and on each adapter (not measured). Each adapter must
    change the base model's answer to the same prompt, or the adapter rows would time the base model."""
    async with httpx.AsyncClient(base_url=target.url, timeout=600, trust_env=False) as client:
        base = await stream_one(client, target.body(prompt(0), 32, None))
        for k in range(n_adapters):
            if (await stream_one(client, target.body(prompt(0), 32, k))).text == base.text:
                raise RuntimeError(f"{target.kind}: adapter {k} gives the base model's 32 greedy tokens: the "
                                   "adapter rows would time the base model")


def bench_target(target: Target, workloads: list[tuple[int, int]], rounds: int, new_tokens: int) -> dict:
    load_before = os.getloadavg()[0]
    asyncio.run(warm_up(target, max(a for _, a in workloads)))
    rows = []
    for clients, adapters in workloads:
        rows.append(asyncio.run(run_workload(target, clients, adapters, rounds, new_tokens)))
        print(target.kind, json.dumps(rows[-1]), flush=True)
    return {"rows": rows, "load_avg_1m": {"before": round(load_before, 1), "after": round(os.getloadavg()[0], 1)}}


# -- targets: servers started here, or one already running ---------------------------------------------
def make_peft_adapters(root: Path, n: int) -> list[Path]:
    from loramux.engine.model_source import resolve_model
    from tests.adapter_factory import make_adapters

    specs = {f"bench-lora-{k}": dict(kind="lora", r=16, alpha=32, targets=LORA_TARGETS, seed=100 + k,
                                            b_std=0.05)
             for k in range(n)}
    return list(make_adapters(resolve_model(None), root, specs).values())


def loramux_run(tmp: Path, peft_dirs: list[Path], workloads, rounds: int, new_tokens: int) -> dict:
    from loramux.engine.model_source import model_name, resolve_model
    from tests.server_process import start_server

    server = start_server(tmp, "--adapters", str(peft_dirs[0].parent)) if peft_dirs else start_server(tmp)
    try:
        target = Target("loramux", server.url, model_name(resolve_model(None)),
                        [{"model": d.name} for d in peft_dirs])
        return {"command": shlex.join(map(str, server.proc.args)), **bench_target(target, workloads, rounds,
                                                                                   new_tokens)}
    finally:
        server.stop()


def llama_run(tmp: Path, peft_dirs: list[Path], workloads, rounds: int, new_tokens: int, threads: int) -> dict:
    from benchmarks.llama_cpp import convert_lora_to_gguf, llama_cpp_version, llama_server
    from loramux.engine.model_source import find_embedded_gguf, model_name, resolve_model

    base_dir = resolve_model(None)
    ggufs = [convert_lora_to_gguf(d, base_dir, tmp / f"{d.name}.gguf") for d in peft_dirs]
    parallel = max(c for c, _ in workloads)
    with llama_server(find_embedded_gguf(), tmp, threads=threads, parallel=parallel, loras=ggufs,
                      alias=model_name(base_dir)) as server:
        loaded = httpx.get(f"{server.url}/lora-adapters", trust_env=False).json()
        ids = {Path(a["path"]).resolve(): a["id"] for a in loaded}
        target = Target("llama", server.url, model_name(base_dir),
                        [{"lora": [{"id": ids[g.resolve()], "scale": 1.0}]} for g in ggufs])
        return {"command": shlex.join(map(str, server.proc.args)), "llama_cpp_version": llama_cpp_version(),
                **bench_target(target, workloads, rounds, new_tokens)}


def detect_target(url: str, kind: str, n_adapters: int) -> Target:
    """A running server: llama-server answers GET /props, loramux does not."""
    def get(path: str) -> httpx.Response:
        return httpx.get(url + path, timeout=10, trust_env=False)

    if kind == "auto":
        kind = "llama" if get("/props").status_code == 200 else "loramux"
    models = get("/v1/models").json()["data"]
    if kind == "llama":
        adapters = [{"lora": [{"id": a["id"], "scale": 1.0}]} for a in get("/lora-adapters").json()]
        target = Target("llama", url, models[0]["id"], adapters)
    else:   # loramux lists the base model (no parent) first, then its adapters
        target = Target("loramux", url, models[0]["id"], [{"model": m["id"]} for m in models if m.get("parent")])
    if len(target.adapters) < n_adapters:
        raise SystemExit(f"{url} serves {len(target.adapters)} adapters; the adapter workload needs {n_adapters}")
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", choices=["both", "loramux", "llama"], default="both")
    ap.add_argument("--url", default=None, help="drive this running server instead of starting one")
    ap.add_argument("--kind", choices=["auto", "loramux", "llama"], default="auto")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 32], help="base-model workloads")
    ap.add_argument("--adapter-clients", type=int, nargs="*", default=[32], help="workloads over the adapters")
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2, help="requests per client, one after another")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="llama-server -t")
    args = ap.parse_args()
    workloads = [(c, 0) for c in args.clients] + [(c, args.adapters) for c in args.adapter_clients]
    n_adapters = args.adapters if args.adapter_clients else 0
    if args.url:
        target = detect_target(args.url.rstrip("/"), args.kind, n_adapters)
        print(json.dumps(bench_target(target, workloads, args.rounds, args.tokens), indent=2))
        return
    servers = {}
    with tempfile.TemporaryDirectory(prefix="loramux-http-bench-") as tmp:
        peft_dirs = make_peft_adapters(Path(tmp) / "adapters", n_adapters)
        if args.server in ("both", "loramux"):
            servers["loramux"] = loramux_run(Path(tmp), peft_dirs, workloads, args.rounds, args.tokens)
        if args.server in ("both", "llama"):
            servers["llama.cpp"] = llama_run(Path(tmp), peft_dirs, workloads, args.rounds, args.tokens, args.threads)
    command = (f"python -m benchmarks.http_bench --server {args.server} --clients {' '.join(map(str, args.clients))} "
               f"--adapter-clients {' '.join(map(str, args.adapter_clients))} --adapters {args.adapters} "
               f"--rounds {args.rounds} --tokens {args.tokens} --threads {args.threads}")
    payload = {"new_tokens": args.tokens, "rounds": args.rounds, "threads": args.threads,
               "adapter": {"peft": "LoRA r=16 alpha=32 on " + "/".join(LORA_TARGETS) + ", B ~ N(0, 0.05)",
                           "count": n_adapters},
               "servers": servers}
    print(write_results("http" if args.server == "both" else f"http_{args.server}", payload, command))


if __name__ == "__main__":
    main()
