"""Bad input, tried: every malformed request gets a 4xx in OpenAI's error shape, never a 500, and the
server answers a normal request exactly right after.

The admin-locked server of tests.server_process.LOCKED (float32, 64-token context so any generation
is short, admin key, one allowed root, 1 MB uploads), shared with the HTTP contract tests. The
schema-driven fuzzing runs the schemathesis CLI against it; the rest are the requests a careless or
hostile client sends on purpose. Security checks without a server: test_security.py. The admin
routes' refusals (admin key, path confinement, malformed uploads) are checked in both
serving modes by test_http_contract*.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from loramux.engine.models.spec import ModelSpec
from tests.adapter_factory import write_small_lora
from tests.server_process import ADMIN_KEY, LOCKED

BASE = "SmolLM2-135M-Instruct"
KEY = ADMIN_KEY
AUTH = {"Authorization": f"Bearer {KEY}"}
NORMAL = {"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def srv(serve, base_model_dir):
    proc = serve(*LOCKED)
    root = proc.adapters_root
    spec = ModelSpec.from_dir(base_model_dir)
    write_small_lora(root / "good", spec, seed=7)
    r = httpx.post(f"{proc.url}/v1/adapters", json={"id": "good", "path": str(root / "good")}, headers=AUTH,
                   timeout=60)
    assert r.status_code == 201, r.text
    srv = SimpleNamespace(url=proc.url, tmp=proc.tmp, root=root, spec=spec, log=proc.log)
    try:
        srv.reference = {model: _complete(srv, model) for model in (BASE, "good")}
        assert srv.reference[BASE] != srv.reference["good"]      # the adapter really acts
        yield srv
    finally:  # the server is shared: leave it as we found it
        httpx.delete(f"{proc.url}/v1/adapters/good", headers=AUTH, timeout=60)


def _complete(srv, model: str) -> str:
    r = httpx.post(f"{srv.url}/v1/completions", json={"model": model, **NORMAL}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def assert_still_serving(srv) -> None:
    """The server answers normal requests, on the base model and an adapter, exactly as before."""
    for model, text in srv.reference.items():
        assert _complete(srv, model) == text
    assert "good" in {a["id"] for a in httpx.get(f"{srv.url}/v1/adapters", headers=AUTH).json()["data"]}


def assert_openai_error(r: httpx.Response, status: int | None = None) -> dict:
    assert 400 <= r.status_code < 500, f"{r.status_code}: {r.text[:500]}"
    if status is not None:
        assert r.status_code == status, r.text[:500]
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["code"], str) and body["error"]["code"], body      # every error has a code
    return body["error"]


def _post(srv, path: str, body, headers: dict | None = None) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{srv.url}{path}", content=raw, timeout=120,
                      headers={"content-type": "application/json", **(headers or {})})


# -- fuzzing from the OpenAPI schema --------------------------------------------------------------

def _focused(schema: dict, adapter: str) -> dict:
    """The same schema with the completion bodies narrowed to what reaches the engine quickly: a
    served `model`, 1-4 new tokens, zero penalties. Random `model` strings are all 404s, random
    `max_tokens` overflow the context (400s) and a missing one fills it (slow on a CPU); every other
    field keeps its full schema."""
    schema = json.loads(json.dumps(schema))
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        body = schema["components"]["schemas"][name]
        props = body["properties"]
        props["model"] = {"type": "string", "enum": [BASE, adapter]}
        for field in ("max_tokens", "max_completion_tokens"):
            if field in props:
                props[field] = {"type": "integer", "minimum": 1, "maximum": 4}
                body["required"] = sorted({*body.get("required", []), field})
    return schema


def _schemathesis(srv, schema_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", str(schema_path), "--url", srv.url,
           "-H", f"Authorization: Bearer {KEY}", "--checks", "not_a_server_error,openai_error_shape",
           "--phases", "examples,coverage,fuzzing", "--mode", "all", "--workers", "1", "--seed", "20261125",
           "--request-timeout", "120", "--suppress-health-check", "all", *args]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "fuzz_checks", "NO_COLOR": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=schema_path.parent, timeout=900,
                          check=False)


def test_fuzz_from_openapi_schema(srv, tmp_path):
    """schemathesis over every operation of the server's own schema (positive and negative data,
    boundary values, wrong content types), then again over the completion routes with bodies
    likely to be served: no 5xx, and every 4xx in OpenAI's error shape."""
    schema = httpx.get(f"{srv.url}/openapi.json").json()
    ops = {f"{m.upper()} {p}" for p, item in schema["paths"].items() for m in item}
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /v1/adapters",
            "DELETE /v1/adapters/{adapter_id}", "POST /v1/load_lora_adapter"} <= ops
    assert "multipart/form-data" in schema["paths"]["/v1/adapters"]["post"]["requestBody"]["content"]
    (tmp_path / "openapi.json").write_text(json.dumps(schema))
    (tmp_path / "focused.json").write_text(json.dumps(_focused(schema, "good")))
    for name, extra in (("openapi.json", ["--max-examples", "30"]),
                        ("focused.json", ["--max-examples", "40", "--include-path-regex", "completions$"])):
        run = _schemathesis(srv, tmp_path / name, *extra)
        assert run.returncode == 0, f"schemathesis on {name}:\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}"
        assert "passed" in run.stdout and "Test cases" in run.stdout, run.stdout[-3000:]
    # The fuzzer may DELETE the adapter (that is allowed); put it back for the checks that follow.
    if "good" not in {a["id"] for a in httpx.get(f"{srv.url}/v1/adapters", headers=AUTH).json()["data"]}:
        r = httpx.post(f"{srv.url}/v1/adapters", json={"id": "good", "path": str(srv.root / "good")}, headers=AUTH)
        assert r.status_code == 201, r.text
    assert "Traceback" not in srv.log()
    assert_still_serving(srv)


# -- malformed requests ---------------------------------------------------------------------------

def _c(**kw) -> dict:
    return {"model": BASE, "prompt": "Hello", "max_tokens": 2, **kw}


def _chat(**kw) -> dict:
    return {"model": BASE, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **kw}


COMPLETION_CASES = {
    # malformed JSON and bodies that are not an object
    "truncated json": b'{"model": "SmolLM2-135M-Instruct", "prompt": ',
    "trailing comma": b'{"model": "SmolLM2-135M-Instruct", "prompt": "x",}',
    "not json": b"model=SmolLM2&prompt=x",
    "empty body": b"",
    "json null": b"null",
    "json array": b"[1, 2]",
    "json string": b'"prompt"',
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    # invalid UTF-8 bytes, and lone surrogates (valid JSON escapes, not valid text)
    "invalid utf-8": b'{"model": "SmolLM2-135M-Instruct", "prompt": "caf\xe9 \xff\xfe"}',
    "invalid utf-8 key": b'{"model": "SmolLM2-135M-Instruct", "\xc3\x28": 1, "prompt": "x", "max_tokens": 2,'
                         b' "n": 0}',
    "lone surrogate prompt": b'{"model": "SmolLM2-135M-Instruct", "prompt": "a\\ud800b", "max_tokens": 2}',
    "lone surrogate list": b'{"model": "SmolLM2-135M-Instruct", "prompt": ["ok", "\\udfff"], "max_tokens": 2}',
    "lone surrogate model": b'{"model": "x\\ud800", "prompt": "hi"}',
    # wrong types
    "prompt number": _c(prompt=5),
    "prompt object": _c(prompt={"text": "x"}),
    "prompt mixed list": _c(prompt=["a", 1]),
    "max_tokens string": _c(max_tokens="ten"),
    "max_tokens float": _c(max_tokens=1.5),
    "temperature string": _c(temperature="hot"),
    "stream string": _c(stream="yes please"),
    "stop number": _c(stop=5),
    "model list": _c(model=[BASE]),
    "model missing": {"prompt": "x"},
    "prompt missing": {"model": BASE},
    "stream_options string": _c(stream=True, stream_options="usage"),
    # limits
    "max_tokens huge": _c(max_tokens=10**30),
    "max_tokens int64": _c(max_tokens=2**63),
    "max_tokens zero": _c(max_tokens=0),
    "max_tokens negative": _c(max_tokens=-5),
    "n zero": _c(n=0),
    "n over limit": _c(n=17),
    "n huge": _c(n=10**20),
    "prompts x n over limit": _c(prompt=["a"] * 16, n=16),
    "logprobs over limit": _c(logprobs=6),
    "logprobs negative": _c(logprobs=-1),
    "temperature over 2": _c(temperature=2.5),
    "top_p zero": _c(top_p=0),
    "top_k negative": _c(top_k=-1),
    "seed over int64": _c(seed=2**64),
    "penalty": _c(presence_penalty=2.5),
    "best_of 2": _c(best_of=2),
    "max_tokens 0 without echo": _c(max_tokens=0),
    "logit_bias key not an id": _c(logit_bias={"x": 1}),
    "guided_regex invalid": _c(guided_regex="(unclosed"),
    "response_format unknown type": _c(response_format={"type": "xml"}),
    "two structured outputs": _c(guided_regex="a", guided_choice=["a"]),
    "stop five": _c(stop=["a", "b", "c", "d", "e"]),
    "stop empty string": _c(stop=[""]),
    # context window and empty prompts
    "prompt over context": _c(prompt="hello " * 200),
    "token prompt over context": _c(prompt=[42] * 100),
    "prompt + max_tokens over context": _c(prompt="hello", max_tokens=64),
    "empty prompt": _c(prompt=""),
    "empty prompt list": _c(prompt=[]),
    "empty token list in batch": _c(prompt=[[]]),
    "empty string in batch": _c(prompt=["ok", ""]),
    "token id negative": _c(prompt=[-1]),
    "token id out of vocab": _c(prompt=[10**9]),
    "token id beyond int64": _c(prompt=[2**70]),
    # unknown models
    "unknown model": _c(model="no-such-adapter"),
    "unknown adapter_id": _c(adapter_id="../../etc/passwd"),
    "stream unknown model": _c(model="nope", stream=True),
    "stream over context": _c(prompt="hello " * 200, stream=True),
}

CHAT_CASES = {
    "messages empty": _chat(messages=[]),
    "messages string": _chat(messages="hi"),
    "role unknown": _chat(messages=[{"role": "wizard", "content": "x"}]),
    "content number": _chat(messages=[{"role": "user", "content": 5}]),
    "content image part": _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]),
    "lone surrogate content": b'{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", '
                              b'"content": "\\udc00"}], "max_tokens": 2}',
    "top_logprobs over limit": _chat(logprobs=True, top_logprobs=21),
    "max_completion_tokens zero": _chat(max_completion_tokens=0),
    "tools": _chat(tools=[{"type": "function", "function": {"name": "f"}}]),
    "chat over context": _chat(messages=[{"role": "user", "content": "hello " * 200}]),
    "mixture unknown adapter": _chat(adapters=[{"id": "nope", "weight": 1.0}]),
    "mixture on an adapter model": _chat(model="good", adapters=[{"id": "good"}]),
    "mixture bad method": _chat(adapters=[{"id": "good"}, {"id": BASE}], merge="magic"),
}


@pytest.mark.parametrize("path,cases", [("/v1/completions", COMPLETION_CASES), ("/v1/chat/completions", CHAT_CASES)],
                         ids=["completions", "chat"])
def test_malformed_requests_get_openai_4xx(srv, path, cases):
    failures = []
    for name, body in cases.items():
        r = _post(srv, path, body)
        try:
            err = assert_openai_error(r)
        except (AssertionError, ValueError) as exc:
            failures.append(f"{name}: {exc}")
            continue
        if name.startswith("unknown") or "unknown model" in name:
            assert r.status_code == 404 and err["code"] == "model_not_found", (name, r.text)
        if "over context" in name:
            assert err["code"] == "context_length_exceeded", (name, r.text)
    assert not failures, "\n".join(failures)
    assert_still_serving(srv)


def test_types_are_strict_and_every_error_has_a_code(srv):
    """A boolean is not an integer and "yes" is not a boolean; a body that is not JSON text (invalid
    UTF-8) is `invalid_json`, as malformed JSON is; nesting past the one JSON bound (128 levels) is
    `json_too_complex` (the admin routes' bodies: test_http_contract_admin.py)."""
    cases = [("/v1/completions", _c(max_tokens=True), "invalid_value", "max_tokens"),
             ("/v1/completions", _c(n=True), "invalid_value", "n"),
             ("/v1/completions", _c(logprobs=True), "invalid_value", "logprobs"),
             ("/v1/completions", _c(seed=False), "invalid_value", "seed"),
             ("/v1/completions", _c(prompt=[1, True]), "invalid_value", "prompt"),
             ("/v1/completions", _c(stream=True, stream_options={"include_usage": "yes"}), "invalid_value",
              "stream_options.include_usage"),
             ("/v1/completions", _c(stream=1), "invalid_value", "stream"),
             ("/v1/chat/completions", _chat(logprobs=1), "invalid_value", "logprobs"),
             ("/v1/chat/completions", _chat(max_completion_tokens=False), "invalid_value", "max_completion_tokens"),
             ("/v1/completions", COMPLETION_CASES["invalid utf-8"], "invalid_json", None),
             ("/v1/completions", b'{"model": "x", "prompt": "y", "z": ' + b"[" * 300 + b"]" * 300 + b"}",
              "json_too_complex", None),                    # past 128 levels of nesting
             ("/v1/completions", COMPLETION_CASES["deep nesting"], "json_too_complex", None),
             ("/v1/chat/completions", b'{"model": "x", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
              "json_too_complex", None),                    # more arrays than any request needs
             ("/v1/completions", _c(prompt="[{" * 50_000), "context_length_exceeded", "prompt")]  # brackets in text
    for path, body, code, param in cases:
        err = assert_openai_error(_post(srv, path, body), 400)
        assert (err["code"], err["param"]) == (code, param), (path, body if isinstance(body, dict) else body[:60], err)
    assert_still_serving(srv)


def test_wrong_content_types_and_methods(srv):
    r = httpx.post(f"{srv.url}/v1/completions", content=json.dumps(_c()), headers={"content-type": "text/plain"})
    assert_openai_error(r, 400)
    assert_openai_error(httpx.get(f"{srv.url}/v1/completions"), 405)
    assert_openai_error(httpx.get(f"{srv.url}/v1/no-such-route"), 404)
    assert_still_serving(srv)


def test_odd_but_valid_sampling_is_served(srv):
    """Values at the edges of the valid ranges are answered, not crashed on: a temperature near 0
    used to overflow the sampler's softmax to NaN inside the engine thread."""
    for body in (_c(temperature=1e-40, seed=-5), _c(temperature=5e-324, top_k=10**20, top_p=1e-300),
                 _c(seed=2**63 - 1, n=3, temperature=2.0), _c(stop="x" * 10_000), _c(logprobs=5, temperature=0),
                 _chat(logprobs=True, top_logprobs=20), _c(prompt=[[1, 2], [3]], n=2)):
        r = _post(srv, "/v1/completions" if "prompt" in body else "/v1/chat/completions", body)
        assert r.status_code == 200, (body, r.text[:300])
    assert_still_serving(srv)
