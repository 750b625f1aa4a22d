"""SIGTERM with requests longer than the drain (issue #28, item 6): every stream gets the tokens
computed before the drain ran out, then an error event and a clean end of its chunked body (no cut
connection); a non-streaming request gets a 503; the process exits 0.

A real `loramux serve` (float32, `--drain-timeout 2`) from the `serve` fixture; the in-drain case
(a stream that fits finishes with [DONE]) is tests/test_reliability.py's SIGTERM test.
"""
from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from tests.test_reliability import BASE, Stream, body, complete, wait_for

DRAIN = 2.0
LONG = 240                    # tokens: far more than the drain lets a 2-core CPU compute for 3 streams


@pytest.fixture(scope="module")
def srv(serve):
    return serve("--dtype", "float32", "--max-model-len", "320", "--kv-cache-gb", "0.05", "--max-num-seqs", "4",
                 "--drain-timeout", str(DRAIN))


def test_sigterm_past_the_drain_ends_each_stream_with_an_error_and_exits_0(srv):
    reference = complete(srv, BASE, 24)          # float32: a stream's first tokens are these, batched or not
    streams = [Stream(srv, body(BASE, LONG)) for _ in range(3)]
    plain: dict = {}

    def non_streaming() -> None:
        r = httpx.post(f"{srv.url}/v1/completions", json=body(BASE, LONG), timeout=300)
        plain.update(status=r.status_code, body=r.json())
    waiter = threading.Thread(target=non_streaming, daemon=True)
    waiter.start()
    wait_for(lambda: all(len(s.events) >= 3 for s in streams), timeout=120, what="the streams to start")
    time.sleep(0.5)                              # the non-streaming request is running too
    signaled = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    for s in streams:
        s.join(60)                               # a cut chunked body would raise in the reader thread
    waiter.join(60)
    ended = time.monotonic() - signaled
    for s in streams:
        last = s.events[-1]
        assert s.status == 200 and isinstance(last, dict) and set(last) == {"error"}, s.events[-3:]
        assert "shutting down" in last["error"]["message"] and "[DONE]" not in s.events
        assert len(s.events) > 3
        common = min(len(s.text), len(reference))
        assert s.text[:common] == reference[:common]
    assert plain["status"] == 503 and "shutting down" in plain["body"]["error"]["message"]
    assert ended < DRAIN + 30
    assert srv.proc.wait(60) == 0, srv.log()[-3000:]
    log = srv.log()
    assert "engine loop died" not in log and "Traceback" not in log, log[-3000:]
