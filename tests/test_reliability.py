"""Faults, survived: it keeps serving and loses nothing.

Real server processes from the `serve` fixture (the shared session server is never disturbed):
- `srv`: adapters registered and unloaded while requests on them run (those finish with the text an
  undisturbed run gives, new ones get a 404); clients that hang up, streaming or not (their
  sequences are aborted, KV blocks and adapter leases return to zero); SIGTERM last (in-flight
  stream completes, new connections refused, exit 0).
- `tight`: one running sequence, a queue of 2 and a 3 s request limit: a full queue answers 503 +
  Retry-After at once, a request over the limit is aborted in the engine and answered 408.
(The engine thread surviving a failing step, on a stub engine: test_async_engine.py.)
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import signal
import threading
import time
from dataclasses import dataclass

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loramux.engine.models.spec import ModelSpec
from tests.adapter_factory import write_small_lora

BASE = "SmolLM2-135M-Instruct"
PROMPT = "Once upon a time, in a small village by the sea,"
IDLE_GAUGES = ("loramux_kv_blocks_used", "loramux_running_sequences", "loramux_queue_depth",
               "loramux_engine_requests")


@pytest.fixture(scope="module")
def spec(base_model_dir) -> ModelSpec:
    return ModelSpec.from_dir(base_model_dir)


@pytest.fixture(scope="module")
def srv(serve):
    return serve("--dtype", "float32", "--max-model-len", "320", "--kv-cache-gb", "0.1", "--max-num-seqs", "4",
                 "--max-loras", "2", "--max-lora-rank", "8")


@pytest.fixture(scope="module")
def tight(serve):
    return serve("--dtype", "float32", "--max-model-len", "512", "--kv-cache-gb", "0.05", "--max-num-seqs", "1",
                 "--max-queue", "2", "--request-timeout", "3", "--max-loras", "1", "--max-lora-rank", "8")


# -- helpers --------------------------------------------------------------------------------------

def metrics(server) -> dict[tuple[str, tuple], float]:
    """Prometheus samples as {(name, sorted labels): value}."""
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def sample(m: dict, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in m.items() if n == name and set(labels.items()) <= set(ls))


def leases(server) -> dict[str, int]:
    return {a["id"]: a["active_leases"] for a in httpx.get(f"{server.url}/v1/adapters", timeout=30).json()["data"]}


def wait_idle(server, timeout: float = 30) -> dict:
    """Wait until nothing is held: KV blocks, running and queued sequences, engine requests and
    adapter leases all back to zero. Returns the last metrics."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        held = {g: sample(m, g) for g in IDLE_GAUGES}
        held.update({f"lease:{k}": v for k, v in leases(server).items() if v})
        if not any(held.values()):
            return m
        assert time.monotonic() < deadline, f"still held after {timeout}s: {held}"
        time.sleep(0.2)


def register(server, adapter_id: str, spec: ModelSpec, seed: int) -> None:
    path = server.adapters_root / f"{adapter_id}-{seed}"
    if not path.exists():
        write_small_lora(path, spec, seed=seed)
    r = httpx.post(f"{server.url}/v1/adapters", json={"id": adapter_id, "path": str(path)}, timeout=60)
    assert r.status_code == 201, r.text


def body(model: str, max_tokens: int, **kw) -> dict:
    return {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **kw}


def complete(server, model: str, max_tokens: int) -> str:
    r = httpx.post(f"{server.url}/v1/completions", json=body(model, max_tokens), timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@dataclass
class Stream:
    """A streaming completion read on a thread: text so far, events, the first-chunk signal."""
    server: object
    request: dict
    stop_after: int | None = None     # hang up after this many chunks

    def __post_init__(self) -> None:
        self.text, self.events, self.status = "", [], None
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        url = f"{self.server.url}/v1/completions"
        with httpx.Client(timeout=300) as client, client.stream("POST", url, json={**self.request, "stream": True}) \
                as r:
            self.status = r.status_code
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                self.events.append(data if data == "[DONE]" else json.loads(data))
                if isinstance(self.events[-1], dict) and self.events[-1].get("choices"):
                    self.text += self.events[-1]["choices"][0]["text"]
                    self.started.set()
                if self.stop_after is not None and len(self.events) >= self.stop_after:
                    return               # leaving the context managers closes the connection
        self.started.set()

    def join(self, timeout: float = 300) -> Stream:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "stream did not finish"
        return self


def wait_for(predicate, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# -- adapters unloaded under load -----------------------------------------------------------------

def test_unload_while_requests_run(srv, spec):
    """DELETE an adapter while a streaming and a non-streaming request run on it: both finish with
    the undisturbed text (their leases keep the weights), new requests get a clear 404 at once."""
    register(srv, "inflight", spec, seed=11)
    reference = complete(srv, "inflight", 48)
    assert reference != complete(srv, BASE, 48)
    with cf.ThreadPoolExecutor(1) as pool:
        stream = Stream(srv, body("inflight", 48))
        plain = pool.submit(complete, srv, "inflight", 48)
        wait_for(lambda: leases(srv).get("inflight") == 2, what="both requests to hold the adapter")
        r = httpx.delete(f"{srv.url}/v1/adapters/inflight")
        assert r.status_code == 200, r.text
        t0 = time.monotonic()
        r = httpx.post(f"{srv.url}/v1/completions", json=body("inflight", 4))
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
        assert time.monotonic() - t0 < 5
        assert "inflight" not in {m["id"] for m in httpx.get(f"{srv.url}/v1/models").json()["data"]}
        assert plain.result(timeout=300) == reference
    stream.join()
    assert stream.text == reference and stream.events[-1] == "[DONE]"
    assert stream.events[-2]["choices"][0]["finish_reason"] == "length"
    wait_idle(srv)


def test_replace_adapter_under_the_same_id_while_in_flight(srv, spec):
    """Unregister + register new weights under the same id while a request runs on the old ones:
    the running request finishes on the old weights, new requests get the new ones."""
    register(srv, "swap", spec, seed=21)
    old = complete(srv, "swap", 24)
    register(srv, "swap-probe", spec, seed=22)
    new = complete(srv, "swap-probe", 12)
    assert httpx.delete(f"{srv.url}/v1/adapters/swap-probe").status_code == 200
    assert old[:len(new)] != new
    stream = Stream(srv, body("swap", 24))
    wait_for(lambda: leases(srv).get("swap") == 1, what="the request to hold the adapter")
    assert httpx.delete(f"{srv.url}/v1/adapters/swap").status_code == 200
    register(srv, "swap", spec, seed=22)
    assert complete(srv, "swap", 12) == new
    assert stream.join().text == old
    assert httpx.delete(f"{srv.url}/v1/adapters/swap").status_code == 200
    wait_idle(srv)


# -- clients that hang up -------------------------------------------------------------------------

def test_stream_client_disconnect_frees_everything(srv, spec):
    register(srv, "gone", spec, seed=31)
    before = metrics(srv)
    stream = Stream(srv, body("gone", 250), stop_after=3)
    stream.join()
    assert stream.status == 200 and len(stream.events) == 3
    after = wait_idle(srv, timeout=30)
    assert sample(after, "loramux_requests_total", model="gone", status="cancelled") == \
        sample(before, "loramux_requests_total", model="gone", status="cancelled") + 1
    generated = sample(after, "loramux_generation_tokens_total", model="gone")
    assert generated - sample(before, "loramux_generation_tokens_total", model="gone") < 250


def test_non_streaming_client_disconnect_aborts(srv):
    """A non-streaming request whose client gives up is aborted too (the server watches for
    the disconnect), rather than generating 250 tokens for nobody."""
    before = metrics(srv)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{srv.url}/v1/completions", json=body(BASE, 250), timeout=httpx.Timeout(60, read=2))
    after = wait_idle(srv, timeout=30)
    cancelled = {"model": BASE, "endpoint": "completions", "status": "cancelled"}
    assert sample(after, "loramux_requests_total", **cancelled) == sample(before, "loramux_requests_total",
                                                                          **cancelled) + 1
    generated = sample(after, "loramux_generation_tokens_total", model=BASE)
    assert generated - sample(before, "loramux_generation_tokens_total", model=BASE) < 250
    assert complete(srv, BASE, 4)                            # and it serves on


# -- full queue and time limit --------------------------------------------------------------------

def test_full_queue_answers_503_with_retry_after_never_hangs(tight):
    def call(_):
        t0 = time.monotonic()
        r = httpx.post(f"{tight.url}/v1/completions", json=body(BASE, 400), timeout=60)
        return r, time.monotonic() - t0

    with cf.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(call, range(6)))
    statuses = sorted(r.status_code for r, _ in results)
    assert set(statuses) <= {408, 503} and statuses.count(503) >= 3, statuses
    for r, elapsed in results:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1" and err["code"] == "queue_full"
            assert elapsed < 10, elapsed                        # refused at once, not queued
        else:
            assert err["code"] == "request_timeout" and elapsed < 3 + 15, elapsed
    wait_idle(tight)
    assert complete(tight, BASE, 2)


def test_request_over_the_time_limit_is_aborted_with_408(tight):
    before = metrics(tight)
    t0 = time.monotonic()
    r = httpx.post(f"{tight.url}/v1/completions", json=body(BASE, 400), timeout=60)
    elapsed = time.monotonic() - t0
    assert r.status_code == 408, r.text
    err = r.json()["error"]
    assert (err["code"], err["type"]) == ("request_timeout", "timeout_error") and "3 s" in err["message"]
    assert 3 <= elapsed < 3 + 15
    after = wait_idle(tight, timeout=10)                       # aborted in the engine: blocks freed
    generated = sample(after, "loramux_generation_tokens_total", model=BASE)
    assert generated - sample(before, "loramux_generation_tokens_total", model=BASE) < 400
    assert sample(after, "loramux_requests_total", status="timeout") == \
        sample(before, "loramux_requests_total", status="timeout") + 1


def test_stream_over_the_time_limit_ends_with_an_error_event(tight):
    stream = Stream(tight, body(BASE, 400)).join(60)
    assert stream.status == 200                                # headers went out before the limit
    last = stream.events[-1]
    assert "[DONE]" not in stream.events and set(last) == {"error"}
    assert (last["error"]["code"], last["error"]["type"]) == ("request_timeout", "timeout_error")
    wait_idle(tight, timeout=10)
    assert complete(tight, BASE, 2)


# -- SIGTERM: drain and exit 0 (last: it stops `srv`) ---------------------------------------------

def test_sigterm_drains_in_flight_and_exits_0(srv):
    reference = complete(srv, BASE, 40)
    stream = Stream(srv, body(BASE, 40))
    assert stream.started.wait(120)
    srv.proc.send_signal(signal.SIGTERM)

    def refused() -> bool:
        try:
            httpx.get(f"{srv.url}/health", timeout=2)
        except httpx.TransportError:
            return True
        return False
    wait_for(refused, timeout=20, what="new connections to be refused")
    stream.join(120)
    assert stream.text == reference and stream.events[-1] == "[DONE]"
    assert srv.proc.wait(90) == 0, srv.log()[-3000:]
    assert "Finished server process" in srv.log()
