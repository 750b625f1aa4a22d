"""Hostile input at the HTTP edge (issue #28's items 1, 4, 5, 8, 9), against a real `loramux serve`.

Each reproduction of the issue gets its expected answer, the server lives on, and another client's
greedy answer, asked while the hostile requests run, is what it was before. Where the issue saw a
keep-alive connection reset after a 500, the next request goes on the same socket.
"""
from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from typing import Self

import httpx
import pytest

from loramux.engine.models.spec import ModelSpec
from tests.adapter_factory import write_small_lora
from tests.server_process import ADMIN_KEY

BASE = "SmolLM2-135M-Instruct"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
NORMAL = {"model": BASE, "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}


@pytest.fixture(scope="module")
def srv(serve):
    # test_hostile.py's flags: one server for both modules
    return serve("--dtype", "float32", "--kv-cache-gb", "0.25", "--max-num-seqs", "4", "--admin-key", ADMIN_KEY)


@pytest.fixture(scope="module")
def reference(srv) -> str:
    r = httpx.post(f"{srv.url}/v1/completions", json=NORMAL, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


class Bystander:
    """Another client asking NORMAL, back to back, while a test's hostile requests run."""

    def __init__(self, url: str) -> None:
        self.url, self.texts, self.errors = url, [], []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join(120)

    def _run(self) -> None:
        with httpx.Client(timeout=120) as client:
            while not self.done.is_set() or not self.texts:
                try:
                    r = client.post(f"{self.url}/v1/completions", json=NORMAL)
                    self.texts.append(r.json()["choices"][0]["text"] if r.status_code == 200 else r.text)
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))
                    return


def chain_grammar(n: int) -> str:
    """The issue's grammar: n chained Lark rules."""
    return "start: r0\n" + "".join(f'r{i}: r{i + 1} | "t{i}"\n' for i in range(n)) + f'r{n}: "end"\n'


def ref_chain_schema(n: int) -> dict:
    """A JSON schema of n chained `$ref`s: as deep a recursion in llguidance as n chained rules."""
    defs = {f"a{i}": {"$ref": f"#/$defs/a{i + 1}"} for i in range(n)}
    defs[f"a{n}"] = {"type": "string"}
    return {"$defs": defs, "$ref": "#/$defs/a0"}


def _alive(srv) -> None:
    assert srv.proc.poll() is None, f"the server died:\n{srv.log()[-3000:]}"
    assert httpx.get(f"{srv.url}/health", timeout=10).status_code == 200


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text[:500]
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["code"], err
    return err


# -- grammars (items 1 and 4) ---------------------------------------------------------------------

# name -> (request fields, the param a 400 names, expected status). Each of these segfaulted today's
# main (the whole process gone) when compiled on an 8 MiB thread stack. Past the bounds: 400; within
# them (3,000 `$ref`s < 4,096 subschemas), compiled on the deep stack and answered.
CRASHING_GRAMMARS = {
    "3,000 chained Lark rules": ({"guided_grammar": chain_grammar(3000)}, "guided_grammar", 400),
    "5,000 chained Lark rules": ({"structured_outputs": {"grammar": chain_grammar(5000)}}, "structured_outputs.grammar",
                                 400),
    "5,000 chained $refs": ({"guided_json": ref_chain_schema(5000)}, "guided_json", 400),
    "3,000 chained $refs in response_format": ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": ref_chain_schema(3000)}}}, "response_format.json_schema.schema", 200),
}


@pytest.mark.parametrize("name", list(CRASHING_GRAMMARS))
def test_a_grammar_that_crashed_the_server_is_answered(srv, reference, name):
    fields, param, status = CRASHING_GRAMMARS[name]
    with Bystander(srv.url) as other:
        r = httpx.post(f"{srv.url}/v1/completions", timeout=120,
                       json={"model": BASE, "prompt": "x", "max_tokens": 4, **fields})
        assert r.status_code == status, r.text[:500]
    if status == 400:
        err = _error(r, 400)
        assert err["param"] == param and err["code"] == "invalid_value", err
        assert "too costly to compile" in err["message"], err
    else:
        assert r.json()["choices"][0]["text"].startswith('"'), r.text     # the chain ends in a JSON string
    _alive(srv)
    assert not other.errors and set(other.texts) == {reference}, (other.errors, other.texts)


def test_grammars_up_to_the_bounds_compile_without_a_crash(srv, reference):
    """The deepest chains the bounds let through, compiled in the server: answered, and it lives."""
    with Bystander(srv.url) as other:
        for fields in ({"guided_grammar": chain_grammar(900)}, {"guided_json": ref_chain_schema(4000)}):
            r = httpx.post(f"{srv.url}/v1/completions", timeout=300,
                           json={"model": BASE, "prompt": "x", "max_tokens": 2, **fields})
            assert r.status_code in (200, 400), r.text[:300]
            _alive(srv)
    assert not other.errors and set(other.texts) == {reference}, (other.errors, other.texts)


def test_a_matcher_error_is_an_error_never_a_stop(srv, reference):
    """The issue's 1,000-rule grammar: llguidance stops with "Current row has 2001 items; max is 2000"
    once generation starts. Today's main answered 200, finish_reason "stop", text "e" (outside the
    grammar's language). Now: an error, in the answer and in the stream."""
    body = {"model": BASE, "prompt": "x", "max_tokens": 4, "temperature": 0, "guided_grammar": chain_grammar(1000)}
    with Bystander(srv.url) as other:
        for _ in range(3):
            r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=120)
            if r.status_code == 200:      # then the text is in the grammar's language, and not cut short
                choice = r.json()["choices"][0]
                assert choice["finish_reason"] == "length" or re.fullmatch(r"(t\d+)*end|t\d+", choice["text"]), choice
                continue
            err = _error(r, 400)
            assert "row has 2001 items" in err["message"] or "structured output failed" in err["message"], err
        with httpx.stream("POST", f"{srv.url}/v1/completions", json={**body, "stream": True}, timeout=120) as s:
            lines = [line for line in s.iter_lines() if line.startswith("data: ")]
    if s.status_code == 200:
        chunks = [json.loads(line[6:]) for line in lines if line != "data: [DONE]"]
        finishes = [c["choices"][0].get("finish_reason") for c in chunks if "choices" in c]
        assert "stop" not in finishes, chunks
        assert any("error" in c for c in chunks), chunks
    _alive(srv)
    assert not other.errors and set(other.texts) == {reference}, (other.errors, other.texts)


# -- parsers (item 5) -----------------------------------------------------------------------------

def _same_socket(srv, requests: list[tuple[str, str, bytes, dict]]) -> list[tuple[int, dict | str]]:
    """Send `requests` one after the other on one keep-alive connection; (status, body) of each. Fails
    if the server closed the connection in between."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=120)
    out = []
    try:
        conn.connect()
        sock = conn.sock
        for method, path, body, headers in requests:
            assert conn.sock is sock, "the server closed the keep-alive connection"
            conn.request(method, path, body=body, headers={"Content-Type": "application/json", **headers})
            resp = conn.getresponse()
            raw = resp.read()
            assert (resp.getheader("connection") or "").lower() != "close", (resp.status, raw[:300])
            try:
                out.append((resp.status, json.loads(raw)))
            except ValueError:
                out.append((resp.status, raw.decode(errors="replace")))
    finally:
        conn.close()
    return out


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


DEEP_JSON = {
    # name -> (request fields, param); each answered 500 by today's main (a RecursionError)
    "guided_json of 200,000 nested brackets": ({"guided_json": _nested(200_000)}, "guided_json"),
    "guided_json nested 5,000 levels": ({"guided_json": '{"a":' * 5000 + "1" + "}" * 5000}, "guided_json"),
    "structured_outputs.json nested 100,000 deep": ({"structured_outputs": {"json": _nested(100_000)}},
                                                     "structured_outputs.json"),
}


@pytest.mark.parametrize("name", list(DEEP_JSON))
def test_deep_json_schema_is_a_400_and_the_connection_lives(srv, reference, name):
    fields, param = DEEP_JSON[name]
    hostile = json.dumps({"model": BASE, "prompt": "x", "max_tokens": 2, **fields}).encode()
    (status, body), (status2, body2) = _same_socket(srv, [
        ("POST", "/v1/completions", hostile, {}), ("POST", "/v1/completions", json.dumps(NORMAL).encode(), {})])
    assert status == 400, body
    assert body["error"]["param"] == param and "JSON" in body["error"]["message"], body
    assert status2 == 200 and body2["choices"][0]["text"] == reference, body2
    _alive(srv)


def test_a_body_nested_past_the_bound_is_refused(srv):
    """A body nested 150 levels (within jiter's 200, past the one bound of 128) is refused like a schema."""
    body = b'{"model": "%s", "prompt": "x", "max_tokens": 2, "x": %s}' % (BASE.encode(), _nested(150).encode())
    (status, err), = _same_socket(srv, [("POST", "/v1/completions", body, {})])
    assert status == 400 and err["error"]["code"] == "json_too_complex", err
    assert "deeper than 128" in err["error"]["message"], err


def test_an_upload_with_a_deep_adapter_config_is_a_400(srv, base_model_dir, tmp_path, reference):
    folder = write_small_lora(tmp_path / "deep", ModelSpec.from_dir(base_model_dir), seed=5)
    (folder / "adapter_config.json").write_text('{"x": ' + _nested(50_000) + "}")
    files = {"adapter_config.json": (folder / "adapter_config.json").read_bytes(),
             "adapter_model.safetensors": (folder / "adapter_model.safetensors").read_bytes()}
    with httpx.Client(base_url=srv.url, timeout=120) as client:
        r = client.post("/v1/adapters", headers=AUTH, data={"id": "deep-config"},
                        files={name: (name, data) for name, data in files.items()})
        err = _error(r, 400)
        assert "adapter_config.json" in err["message"] and "JSON" in err["message"], err
        again = client.post("/v1/completions", json=NORMAL)          # the same connection goes on
        assert again.status_code == 200 and again.json()["choices"][0]["text"] == reference
    assert httpx.get(f"{srv.url}/v1/adapters/deep-config", headers=AUTH).status_code == 404
    _alive(srv)


def test_register_by_a_too_long_path_is_a_400(srv, reference):
    path = str(srv.adapters_root / ("a" * 10_000))
    (status, body), (status2, body2) = _same_socket(srv, [
        ("POST", "/v1/adapters", json.dumps({"id": "long", "path": path}).encode(), AUTH),
        ("POST", "/v1/completions", json.dumps(NORMAL).encode(), {})])
    assert status == 400 and body["error"]["param"] == "path", body
    assert "too long" in body["error"]["message"], body
    assert status2 == 200 and body2["choices"][0]["text"] == reference
    _alive(srv)


# -- metrics (item 8) -----------------------------------------------------------------------------

def _model_labels(srv) -> set[str]:
    text = httpx.get(f"{srv.url}/metrics", timeout=30).text
    return set(re.findall(r'\bmodel="([^"]*)"', text))


def test_metrics_model_label_is_bounded_by_what_is_registered(srv, base_model_dir):
    spec = ModelSpec.from_dir(base_model_dir)
    write_small_lora(srv.adapters_root / "metric-src", spec, seed=11)
    r = httpx.post(f"{srv.url}/v1/adapters", json={"id": "metric-src", "path": str(srv.adapters_root / "metric-src")},
                   headers=AUTH, timeout=60)
    assert r.status_code == 201, r.text
    try:
        for body in ({"model": "metric-src"}, *({"model": BASE, "adapters": [{"id": "metric-src", "weight": w}]}
                                                 for w in (0.25, 0.5, 0.75, 1.5))):
            r = httpx.post(f"{srv.url}/v1/completions", timeout=120,
                           json={"prompt": "Hello", "max_tokens": 2, "temperature": 0, **body})
            assert r.status_code == 200, r.text
        labels = _model_labels(srv)
        assert {"metric-src", "(mixture)", BASE} <= labels, labels
        assert not [label for label in labels if label.startswith("mix-")], labels    # 4 mixtures, one label
        registered = {a["id"] for a in httpx.get(f"{srv.url}/v1/adapters", headers=AUTH).json()["data"]}
        assert labels <= registered | {BASE, "(mixture)"}, labels
    finally:
        assert httpx.delete(f"{srv.url}/v1/adapters/metric-src", headers=AUTH, timeout=60).status_code == 200
    assert "metric-src" not in _model_labels(srv)


# -- smaller ones (item 9) ------------------------------------------------------------------------

def test_negative_stop_token_id_names_its_param(srv):
    r = httpx.post(f"{srv.url}/v1/completions", json={**NORMAL, "stop_token_ids": [-1]}, timeout=60)
    err = _error(r, 400)
    assert err["param"] == "stop_token_ids", err


def test_a_stalled_body_gets_408(srv, reference):
    """Content-Length 1000, 2 bytes sent, then nothing: today's main holds the connection forever."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"")
        start = time.monotonic()
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        waited = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b'"request_timeout"' in answer, answer
    assert waited < 30, waited
    r = httpx.post(f"{srv.url}/v1/completions", json=NORMAL, timeout=120)
    assert r.json()["choices"][0]["text"] == reference


def test_a_gzip_body_gets_415(srv, reference):
    import gzip

    body = gzip.compress(json.dumps(NORMAL).encode())
    r = httpx.post(f"{srv.url}/v1/completions", content=body, timeout=60,
                   headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    err = _error(r, 415)
    assert err["code"] == "unsupported_media_type" and "gzip" in err["message"], err
    r = httpx.post(f"{srv.url}/v1/completions", json=NORMAL, timeout=120)
    assert r.json()["choices"][0]["text"] == reference
