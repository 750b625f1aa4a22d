"""What the scheduler benchmarks share: a server of their own, a streamed completion timed token
by token over real HTTP, percentiles, and the machine's load while they ran."""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np


@dataclass
class Stream:
    """One streamed completion: when it was sent and when each token arrived (perf_counter seconds)."""
    sent: float
    token_times: list[float] = field(default_factory=list)
    text: str = ""
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.sent if self.token_times else None

    def gaps(self, start: float = float("-inf"), end: float = float("inf")) -> list[float]:
        """Inter-token latencies of tokens that arrived in [start, end]."""
        return [b - a for a, b in itertools.pairwise(self.token_times) if start <= b <= end]


async def stream_completion(client: httpx.AsyncClient, body: dict, stream: Stream | None = None) -> Stream:
    """POST a streamed /v1/completions; `logprobs: 0` makes every token an event of its own (a token
    whose text is held back by the detokenizer would otherwise arrive with the next one)."""
    s = stream or Stream(time.perf_counter())
    body = {**body, "stream": True, "logprobs": 0}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            s.error = f"{r.status_code} {(await r.aread()).decode()[:300]}"
            return s
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                s.error = chunk["error"]["message"]
                continue
            for choice in chunk.get("choices", []):
                if choice.get("logprobs") or choice.get("text"):
                    s.token_times.append(time.perf_counter())
                    s.text += choice.get("text") or ""
    return s


def pct(values: list[float], digits: int = 4) -> dict:
    if not values:
        return {"n": 0}
    a = np.asarray(values)
    return {"n": len(values), "p50": round(float(np.percentile(a, 50)), digits),
            "p99": round(float(np.percentile(a, 99)), digits), "max": round(float(a.max()), digits),
            "mean": round(float(a.mean()), digits)}


@contextlib.contextmanager
def own_server(tmp: Path, *flags: str) -> Iterator[str]:
    """A `loramux serve` of this checkout with `flags` on a free loopback port; stopped on exit."""
    from tests.server_process import start_server

    tmp.mkdir(parents=True, exist_ok=True)
    server = start_server(tmp, *flags, timeout=600)
    try:
        yield server.url
    finally:
        server.stop()


class LoadWatch:
    """The 1-minute load average at start and end: the machine may be shared, the results say so."""

    def __init__(self) -> None:
        self.samples = [round(os.getloadavg()[0], 2)]

    def note(self) -> None:
        self.samples.append(round(os.getloadavg()[0], 2))

    def report(self) -> dict:
        return {"load_avg_1m_samples": self.samples, "cpu_count": os.cpu_count()}
