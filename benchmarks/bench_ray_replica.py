"""One Ray Serve replica against the single server, over HTTP (issue #26: `loramux serve --ray
--replicas 1` at >= 0.9x the single server's tok/s at 1 and 32 clients).

    python -m benchmarks.bench_ray_replica [--clients 1 32] [--rounds 2] [--tokens 64]

The same client as benchmarks/http_bench.py (streamed completions, distinct prompts, greedy,
ignore_eos) against `loramux serve` and then `loramux serve --ray --replicas 1 --replica-cpus N`
(N = this machine's CPUs, the threads the single server uses), defaults otherwise, one after the
other on the same machine. Reported: each workload's rows from both and the ratio of their tok/s.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from benchmarks.common import write_results
from benchmarks.http_bench import bench_target, detect_target
from tests.server_process import start_server


def measure(tmp: Path, flags: tuple[str, ...], workloads: list[tuple[int, int]], rounds: int, tokens: int) -> dict:
    tmp.mkdir(parents=True)
    server = start_server(tmp, *flags, timeout=900)
    try:
        return bench_target(detect_target(server.url, "loramux", 0), workloads, rounds, tokens)
    finally:
        server.stop()


def run(clients: list[int], rounds: int, tokens: int) -> dict:
    workloads = [(c, 0) for c in clients]
    cpus = str(os.cpu_count())
    with tempfile.TemporaryDirectory(prefix="loramux-ray-bench-") as tmp:
        single = measure(Path(tmp) / "single", (), workloads, rounds, tokens)
        ray = measure(Path(tmp) / "ray", ("--ray", "--replicas", "1", "--replica-cpus", cpus), workloads, rounds,
                      tokens)
    ratios = {str(s["clients"]): round(r["tok_s"] / s["tok_s"], 3) for s, r in zip(single["rows"], ray["rows"])}
    return {"clients": clients, "rounds": rounds, "new_tokens": tokens, "replica_cpus": int(cpus),
            "single": single, "ray_one_replica": ray, "ray_tok_s_over_single": ratios,
            "goal_met": all(v >= 0.9 for v in ratios.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    res = run(args.clients, args.rounds, args.tokens)
    print(res["ray_tok_s_over_single"])
    print(write_results("ray_replica", res, f"python -m benchmarks.bench_ray_replica --clients "
                        f"{' '.join(map(str, args.clients))} --rounds {args.rounds} --tokens {args.tokens}"))


if __name__ == "__main__":
    main()
