"""Register-to-first-token: how soon a new adapter answers after it is registered over HTTP.

    python -m benchmarks.bench_register [--rank 16] [--trials 5]

A real server process; each trial writes a fresh peft-format r=16 LoRA (all attention
projections), POSTs it to /v1/adapters and streams a completion on it; the clock runs from the
POST until the first streamed token. Goal: under 1 s.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common import write_results
from loramux.engine.model_source import resolve_model
from loramux.engine.models.spec import ModelSpec
from tests.adapter_factory import write_small_lora
from tests.server_process import start_server


def first_token_seconds(url: str, adapter_id: str, path: Path) -> tuple[float, float]:
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/adapters", json={"id": adapter_id, "path": str(path)}, timeout=60)
    r.raise_for_status()
    t_registered = time.perf_counter() - t0
    body = {"model": adapter_id, "prompt": "Hello", "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]" and json.loads(line[6:])["choices"][0]["text"]:
                return t_registered, time.perf_counter() - t0
    raise RuntimeError("no token streamed")


def run(rank: int = 16, trials: int = 5) -> dict:
    spec = ModelSpec.from_dir(resolve_model(None))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "adapters").mkdir()
        server = start_server(root, "--allowed-root", str(root / "adapters"))
        try:
            rows = []
            for i in range(trials):
                path = root / "adapters" / f"fresh-{i}"
                write_small_lora(path, spec, seed=i, r=rank, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
                reg, ttft = first_token_seconds(server.url, f"fresh-{i}", path)
                rows.append({"register_s": round(reg, 3), "register_to_first_token_s": round(ttft, 3)})
                print(rows[-1], flush=True)
        finally:
            server.stop()
    median = statistics.median(r["register_to_first_token_s"] for r in rows)
    return {"rank": rank, "targets": "q,k,v,o", "trials": rows, "median_register_to_first_token_s": median,
            "goal": "< 1 s", "goal_met": median < 1.0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--trials", type=int, default=5)
    args = ap.parse_args()
    result = run(args.rank, args.trials)
    print(write_results("register", result, f"python -m benchmarks.bench_register --rank {args.rank} "
                                            f"--trials {args.trials}"))


if __name__ == "__main__":
    main()
