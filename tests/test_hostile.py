"""Hostile requests against a live server: none may stall the other clients; a second start on a
live server's data directory touches nothing.

One real `loramux serve` (float32, the default 2048-token context and 2 MiB body bound, admin
key), from the `serve` fixture. For each hostile request a stream is running and `/health` is polled back to back; the
request is sent once both have settled, and compared with the same measures over the moment before:

    /health latency and the stream's gap between two tokens may grow by at most STALL_BOUND.

Why 0.5 s holds on a 2-core x86-64 CPU (OMP_WAIT_POLICY=PASSIVE, as the suite runs): what the event
loop itself does for any request is bounded by the body bound. A body past it is refused as its
Content-Length (or, chunked, its running count) passes 2 MiB, before any parsing; so is a body of
more than 32,768 JSON arrays and objects or nested deeper than 128 levels, after a count in C (~10 ms
for 2 MiB); what is left is parsed by jiter, which holds the GIL ~50 ms for the costliest
2 MiB left (a million token ids, ~25 ms of CPU per MiB measured); long fields are then checked in
a worker thread, by C calls or by Python code that yields the GIL every 5 ms.
A prompt whose character count already rules out the context window is refused before
tokenizing; templating and tokenizing run in at most two worker threads with the GIL released,
so the engine keeps at least one of the two cores. Today's main stalls everything for seconds on
the same requests (a 20 MB body: 22 s), which these checks catch.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Self

import httpx
import pytest

from loramux.engine.models.spec import ModelSpec
from tests.adapter_factory import write_small_lora
from tests.server_process import ADMIN_KEY

BASE = "SmolLM2-135M-Instruct"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
STALL_BOUND = 0.5             # seconds a hostile request may add to /health latency or a stream's token gap
BODY_BOUND = 2 << 20          # the server's default --max-request-mb
CONTEXT = 2048                # the server's default --max-model-len
QUIET = 1.5                   # seconds of undisturbed service measured before each hostile request


@pytest.fixture(scope="module")
def srv(serve):
    return serve("--dtype", "float32", "--kv-cache-gb", "0.25", "--max-num-seqs", "4", "--admin-key", ADMIN_KEY)


# -- watching the other clients -------------------------------------------------------------------

@dataclass
class Watch:
    """A running stream (arrival time of each chunk) and /health polled back to back (start, end)."""
    url: str
    chunks: list[float] = field(default_factory=list)
    polls: list[tuple[float, float]] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Self:
        self.threads = [threading.Thread(target=self._stream, daemon=True),
                        threading.Thread(target=self._poll, daemon=True)]
        for t in self.threads:
            t.start()
        deadline = time.monotonic() + 120
        while len(self.chunks) < 5 or len(self.polls) < 5:
            assert time.monotonic() < deadline and not self.done.is_set(), "the stream did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        for t in self.threads:
            t.join(30)

    def _stream(self) -> None:
        body = {"model": BASE, "prompt": "Once upon a time,", "max_tokens": 1500, "temperature": 0,
                "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60) as client, client.stream("POST", f"{self.url}/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    self.chunks.append(time.monotonic())
                if self.done.is_set():
                    return          # hanging up aborts the request

    def _poll(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.done.is_set():
                start = time.monotonic()
                try:
                    client.get(f"{self.url}/health").raise_for_status()
                except httpx.HTTPError:
                    pass             # a timeout counts as the time it took
                self.polls.append((start, time.monotonic()))
                time.sleep(0.02)

    def worst(self, a: float, b: float) -> tuple[float, float]:
        """(slowest /health answer, longest gap between two stream chunks) over the moments [a, b]."""
        health = max((end - start for start, end in list(self.polls) if end >= a and start <= b), default=0.0)
        chunks = list(self.chunks)
        gaps = [t1 - t0 for t0, t1 in pairwise(chunks) if t1 >= a and t0 <= b]
        assert chunks and chunks[-1] > b, "the stream sent nothing after the window"
        return health, max(gaps, default=0.0)


def _text(n: int) -> str:
    return "a " * (n // 2)


def _json(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _huge_body() -> bytes:
    return _json({"model": BASE, "prompt": _text(20_000_000), "max_tokens": 4})


def _chunked(data: bytes):
    for i in range(0, len(data), 1 << 16):
        yield data[i:i + (1 << 16)]


# name -> (route, body (bytes, or a function making a chunked body), status, error code)
HOSTILE = {
    # 20 MB, refused by Content-Length / by the running count of a chunked body
    "huge body": ("/v1/completions", _huge_body, 413, "request_too_large"),
    "huge chunked body": ("/v1/completions", lambda: _chunked(_huge_body()), 413, "request_too_large"),
    # just under the body bound: a million-token prompt, refused by its character count alone
    "huge prompt": ("/v1/completions", lambda: _json({"model": BASE, "prompt": _text(BODY_BOUND - 100),
                                                      "max_tokens": 4}), 400, "context_length_exceeded"),
    # as long as the character count allows (81 characters per token at most): tokenized, then refused
    "longest prompt the character check lets through": (
        "/v1/completions", lambda: _json({"model": BASE, "prompt": _text(160_000), "max_tokens": 4}),
        400, "context_length_exceeded"),
    # 128 prompts that each pass the character check: the first one tokenized stops the request
    "many prompts": ("/v1/completions", lambda: _json({"model": BASE, "prompt": [_text(16_000)] * 128,
                                                       "max_tokens": 4}), 400, "context_length_exceeded"),
    # half a million token-id lists, or objects in a field nobody reads: refused before parsing
    "many token-id lists": ("/v1/completions", lambda: _json({"model": BASE, "prompt": [[1]] * 500_000}),
                            400, "json_too_complex"),
    "many objects in an unknown field": ("/v1/chat/completions", lambda: _json({
        "model": BASE, "messages": [{"role": "user", "content": "hi"}], "x": [{}] * 650_000}), 400,
        "json_too_complex"),
    # the costliest body left to parse: a million token ids, refused by their count before any other check
    "a million token ids": ("/v1/completions", lambda: _json({"model": BASE, "prompt": [1] * (BODY_BOUND // 2 - 50),
                                                              "max_tokens": 4}), 400, "context_length_exceeded"),
    "deep JSON": ("/v1/completions", lambda: b"[" * 100_000 + b"]" * 100_000, 400, "json_too_complex"),
    "chat with a huge message": ("/v1/chat/completions", lambda: _json({
        "model": BASE, "messages": [{"role": "user", "content": _text(BODY_BOUND - 200)}], "max_tokens": 4}),
        400, "context_length_exceeded"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_request_does_not_stall_other_clients(srv, name):
    path, make_body, status, code = HOSTILE[name]
    body = make_body()
    with Watch(srv.url) as watch:
        time.sleep(QUIET)
        a = time.monotonic()
        r = httpx.post(f"{srv.url}{path}", content=body, timeout=300, headers={"content-type": "application/json"})
        b = time.monotonic()
        time.sleep(0.5)                   # the stream's next chunk after the request
        quiet = watch.worst(a - QUIET, a - 0.1)
        health, gap = watch.worst(a, b)
    print(f"{name}: answered in {b - a:.2f} s; /health {quiet[0]:.3f} -> {health:.3f} s, "
          f"stream gap {quiet[1]:.3f} -> {gap:.3f} s")
    assert r.status_code == status, r.text[:300]
    err = r.json()["error"]
    assert err["code"] == code and err["message"], err
    assert health <= quiet[0] + STALL_BOUND, f"/health took {health:.2f} s during {name!r} ({quiet[0]:.2f} s before)"
    assert gap <= quiet[1] + STALL_BOUND, f"the stream waited {gap:.2f} s for a token during {name!r} " \
                                          f"({quiet[1]:.2f} s before)"
    assert "Traceback" not in srv.log()


def test_hostile_requests_leave_the_server_exact(srv):
    """After all that, a greedy completion is what it was and nothing is held."""
    body = {"model": BASE, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}
    first = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=120)
    assert first.status_code == 200, first.text
    for _ in range(2):
        again = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=120)
        assert again.json()["choices"] == first.json()["choices"]
    deadline = time.monotonic() + 30       # the watchers' streams were aborted when they hung up
    while "loramux_kv_blocks_used 0.0" not in httpx.get(f"{srv.url}/metrics").text:
        assert time.monotonic() < deadline, "KV blocks still held"
        time.sleep(0.2)


# -- a second start on a live server's data directory ---------------------------------------------

def _serve(data_dir: Path, port: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loramux", "serve", "--port", str(port), "--data-dir", str(data_dir),
                           "--dtype", "float32"], capture_output=True, text=True, timeout=300, check=False,
                          cwd=Path(__file__).resolve().parent.parent)


def test_second_start_on_a_live_data_dir_fails_and_touches_nothing(srv, base_model_dir):
    """The issue's operator mistake: a second `loramux serve` on the same --data-dir and port. It must
    fail before loading the model and leave the live server's cached mixture alone."""
    spec = ModelSpec.from_dir(base_model_dir)
    write_small_lora(srv.adapters_root / "src", spec, seed=3)
    r = httpx.post(f"{srv.url}/v1/adapters", json={"id": "src", "path": str(srv.adapters_root / "src")},
                   headers=AUTH, timeout=60)
    assert r.status_code == 201, r.text
    mix = {"adapters": [{"id": "src", "weight": 0.5}], "merge": "linear"}
    r = httpx.post(f"{srv.url}/v1/completions", timeout=120, json={
        "model": BASE, "prompt": "Hi", "max_tokens": 2, "temperature": 0, **mix})
    assert r.status_code == 200, r.text
    mixtures = srv.tmp / "data" / "mixtures"
    cached = sorted(p.name for p in mixtures.iterdir())
    assert cached

    second = _serve(srv.tmp / "data", srv.port)
    assert second.returncode != 0
    assert "in use by another loramux process" in second.stderr, second.stderr[-2000:]
    assert "memory: base weights" not in second.stderr       # refused before the model was loaded
    assert sorted(p.name for p in mixtures.iterdir()) == cached
    r = httpx.post(f"{srv.url}/v1/adapters", json={"id": "blend", "mixture": mix}, headers=AUTH, timeout=120)
    assert r.status_code == 201, r.text                       # the 400 "not a directory"
    for adapter_id in ("blend", "src"):                       # the server is shared: leave it as we found it
        assert httpx.delete(f"{srv.url}/v1/adapters/{adapter_id}", headers=AUTH, timeout=60).status_code == 200


def test_data_dir_lock_is_never_stale(tmp_path):
    """The lock is the kernel's (flock): a holder killed with SIGKILL leaves nothing to clean up."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from loramux.adapters_registry.datadir_lock import claim_data_dir; "
        f"lock = claim_data_dir({str(tmp_path)!r}); print('held', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        from loramux.adapters_registry.datadir_lock import DataDirBusy, claim_data_dir
        with pytest.raises(DataDirBusy, match=f"pid {holder.pid}"):
            claim_data_dir(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    claim_data_dir(tmp_path).release()
