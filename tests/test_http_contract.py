"""The HTTP contract: every route answers the same way from `loramux serve` and from loramux on Ray
Serve, because both mount the same routes (server/api.py) over their own backends.

Each test runs against both (`target`): first an admin-locked single server (tests.server_process.LOCKED,
shared with test_bad_input.py), then the session's Ray cluster (tests.ray_cluster, shared with
test_http_ray.py). Real HTTP over real sockets, real adapter files, every error in OpenAI's shape.
Whatever a test registers is deleted after it (`admin`), so both servers stay as they were found.
The admin routes' bodies (uploads, mixtures) and refusals live in test_http_contract_admin.py.
"""
from __future__ import annotations

import json

import httpx
import pytest

from loramux.engine.models.spec import ModelSpec
from tests.adapter_factory import write_small_lora
from tests.http_contract import AUTH, BASE, assert_openai_error, completion, ids


@pytest.fixture(scope="module")
def spec(base_model_dir) -> ModelSpec:
    return ModelSpec.from_dir(base_model_dir)


def test_same_routes_in_both_modes(target):
    """Both modes document the same operations (Ray adds /v1/replicas), uploads included."""
    schema = httpx.get(f"{target.url}/openapi.json").json()
    ops = {f"{m.upper()} {p}" for p, item in schema["paths"].items() for m in item}
    assert ops - {"GET /v1/replicas"} == {
        "POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models", "GET /health", "GET /metrics",
        "POST /v1/adapters", "GET /v1/adapters", "GET /v1/adapters/{adapter_id}", "DELETE /v1/adapters/{adapter_id}",
        "POST /v1/load_lora_adapter", "POST /v1/unload_lora_adapter"}
    assert "multipart/form-data" in schema["paths"]["/v1/adapters"]["post"]["requestBody"]["content"]
    assert {"CompletionRequest", "ChatCompletionRequest"} <= set(schema["components"]["schemas"])


def test_admin_routes_need_the_key(target):
    routes = [("GET", "/v1/adapters", {}), ("GET", "/v1/adapters/any", {}), ("DELETE", "/v1/adapters/any", {}),
              ("POST", "/v1/adapters", {"json": {"id": "x", "path": str(target.adapters_root)}}),
              ("POST", "/v1/adapters", {"data": {"id": "x"}, "files": {"adapter_config.json": b"{}"}}),
              ("POST", "/v1/load_lora_adapter", {"json": {"lora_name": "x", "lora_path": str(target.adapters_root)}}),
              ("POST", "/v1/unload_lora_adapter", {"json": {"lora_name": "x"}})]
    key = AUTH["Authorization"].removeprefix("Bearer ")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}, {"Authorization": f"Basic {key}"},
                    {"Authorization": "Bearer"}, {"Authorization": f"Bearer {key}x"}):
        for method, path, body in routes:
            r = httpx.request(method, f"{target.url}{path}", headers=headers, timeout=60, **body)
            err = assert_openai_error(r, 401)
            assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
    for path in ("/v1/models", "/health", "/metrics"):                  # the OpenAI routes stay open
        assert httpx.get(f"{target.url}{path}", timeout=60).status_code == 200


def test_inference_routes(target):
    url = target.url
    assert httpx.get(f"{url}/health", timeout=60).json() == {"status": "ok"}
    models = httpx.get(f"{url}/v1/models", timeout=60).json()
    assert models["object"] == "list"
    base = models["data"][0]
    assert (base["id"], base["object"], base["owned_by"], base["root"], base["parent"]) == \
        (BASE, "model", "loramux", BASE, None) and isinstance(base["created"], int)

    r = completion(url, BASE, stream=False)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == BASE and body["choices"][0]["text"]
    assert body["usage"]["completion_tokens"] == 4 and body["usage"]["prompt_tokens"] > 0
    streamed = completion(url, BASE, stream=True)
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == body["choices"][0]["text"]

    chat = {"model": BASE, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4,
            "temperature": 0, "logprobs": True, "top_logprobs": 2}
    r = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["role"] == "assistant" and len(choice["logprobs"]["content"]) == 4
    r = httpx.post(f"{url}/v1/completions", timeout=120, json={
        "model": BASE, "prompt": "Hi", "max_tokens": 3, "temperature": 0, "logprobs": 2})
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 3
    assert lp["text_offset"] == [0, len(lp["tokens"][0]), len(lp["tokens"][0]) + len(lp["tokens"][1])]

    assert "loramux_requests_total{" in httpx.get(f"{url}/metrics", timeout=60).text


def test_inference_errors(target):
    url = target.url
    r = completion(url, "no-such-adapter")
    assert assert_openai_error(r, 404)["code"] == "model_not_found"
    r = httpx.post(f"{url}/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": -1}, timeout=60)
    assert assert_openai_error(r, 400)["param"] == "max_tokens"
    r = httpx.post(f"{url}/v1/completions", json={"model": BASE, "prompt": "x " * 5000}, timeout=60)
    assert assert_openai_error(r, 400)["code"] == "context_length_exceeded"
    r = httpx.post(f"{url}/v1/completions", content=b'{"model": ', headers={"content-type": "application/json"},
                   timeout=60)
    assert assert_openai_error(r, 400)["code"] == "invalid_json"
    r = httpx.post(f"{url}/v1/completions", content=b"{}", headers={"content-type": "text/plain"}, timeout=60)
    assert assert_openai_error(r, 400)["code"] == "unsupported_media_type"
    assert_openai_error(httpx.get(f"{url}/v1/completions", timeout=60), 405)
    assert_openai_error(httpx.get(f"{url}/v1/no-such-route", timeout=60), 404)
    r = httpx.post(f"{url}/v1/completions", content=b"x" * (3 << 20), headers={"content-type": "application/json"},
                   timeout=60)
    assert assert_openai_error(r, 413)["code"] == "request_too_large"


def test_register_by_path_list_get_delete(target, admin, spec):
    src = write_small_lora(target.adapters_root / "c-path", spec, seed=41)
    r = admin.post("/v1/adapters", json={"id": "c-path", "path": str(src)})
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["object"], body["id"], body["type"], body["rank"], body["targets"]) == \
        ("adapter", "c-path", "lora", 2, ["q_proj", "v_proj"])
    err = assert_openai_error(admin.post("/v1/adapters", json={"id": "c-path", "path": str(src)}), 409)
    assert "already exists" in err["message"] and err["param"] == "id"

    listed = admin.get("/v1/adapters").json()
    assert listed["object"] == "list" and "c-path" in ids(listed)
    got = admin.get("/v1/adapters/c-path").json()
    assert (got["object"], got["id"], got["type"], got["rank"]) == ("adapter", "c-path", "lora", 2)
    assert "c-path" in ids(httpx.get(f"{target.url}/v1/models", timeout=60).json())
    tuned = completion(target.url, "c-path")
    assert tuned.status_code == 200, tuned.text
    assert tuned.json()["model"] == "c-path"

    r = admin.delete("/v1/adapters/c-path")
    assert r.status_code == 200 and r.json() == {"id": "c-path", "object": "adapter", "deleted": True}
    assert assert_openai_error(completion(target.url, "c-path"), 404)["code"] == "model_not_found"
    err = assert_openai_error(admin.delete("/v1/adapters/c-path"), 404)
    assert err["code"] == "adapter_not_found" and "does not exist" in err["message"]
    assert assert_openai_error(admin.get("/v1/adapters/c-path"), 404)["code"] == "adapter_not_found"
    assert "c-path" not in ids(admin.get("/v1/adapters").json())
    assert src.is_dir()                                   # the source is never touched


def test_vllm_load_and_unload(target, admin, spec):
    src = write_small_lora(target.adapters_root / "c-vllm", spec, seed=42)
    r = admin.post("/v1/load_lora_adapter", json={"lora_name": "c-vllm", "lora_path": str(src),
                                                   "load_inplace": False})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'c-vllm' added successfully."
    assert completion(target.url, "c-vllm").status_code == 200
    assert_openai_error(admin.post("/v1/load_lora_adapter", json={"lora_name": "c-vllm", "lora_path": str(src)}),
                        409)
    err = assert_openai_error(admin.post("/v1/load_lora_adapter", json={"lora_name": "c-vllm"}), 400)
    assert err["param"] == "lora_path"
    r = admin.post("/v1/unload_lora_adapter", json={"lora_name": "c-vllm"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'c-vllm' removed successfully."
    assert "c-vllm" not in ids(admin.get("/v1/adapters").json())
    assert assert_openai_error(completion(target.url, "c-vllm"), 404)["code"] == "model_not_found"
    assert assert_openai_error(admin.post("/v1/unload_lora_adapter", json={"lora_name": "c-vllm"}),
                               404)["code"] == "adapter_not_found"


def test_trainer_registers_by_path_or_by_upload(target, spec, tmp_path):
    """trainer/register.py: by path when the server may read it, else it falls back to an upload."""
    register = pytest.importorskip("loramux.trainer.register")
    key = AUTH["Authorization"].removeprefix("Bearer ")
    inside = write_small_lora(target.adapters_root / "c-tr-in", spec, seed=43)
    outside = write_small_lora(tmp_path / "c-tr-out", spec, seed=44)
    try:
        for adapter_id, folder in (("c-tr-in", inside), ("c-tr-out", outside)):
            out = register.register_adapter(target.url, adapter_id, folder, admin_key=key)
            assert out["id"] == adapter_id and not out["source"].startswith(str(folder))   # copied in
            assert completion(target.url, adapter_id).status_code == 200
        with pytest.raises(register.RegisterError, match="401"):
            register.register_adapter(target.url, "c-tr-x", inside, admin_key="wrong")
    finally:
        for adapter_id in ("c-tr-in", "c-tr-out"):
            httpx.delete(f"{target.url}/v1/adapters/{adapter_id}", headers=AUTH, timeout=60)
