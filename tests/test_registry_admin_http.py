"""The admin router over a real socket: uvicorn in a thread, httpx as the client, no model."""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from fastapi import FastAPI

from loramux.adapters_registry import AdapterRegistry, RegistryConfig
from loramux.server.admin_routes import make_admin_router
from loramux.server.local_backend import RegistryAdmin
from tests.adapter_factory import TINY_SPEC, write_lora_files, write_prefix_files

KEY = "s3cret-admin-key"
LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("http")
    allowed = root / "allowed"
    allowed.mkdir()
    cfg = RegistryConfig(data_dir=root / "data", max_loras=2, max_lora_rank=8, allowed_roots=(allowed,),
                         max_upload_bytes=LIMIT)
    registry = AdapterRegistry(TINY_SPEC, cfg, dtype=torch.float32, device=torch.device("cpu"),
                               base_model_name="tiny-base")
    app = FastAPI()
    app.include_router(make_admin_router(RegistryAdmin(registry), KEY))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as client:
        yield registry, client, root, allowed
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def assert_openai_error(r: httpx.Response, status: int, words: str = "") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["type"], str)
    assert words in err["message"], err["message"]
    return err


def _files(folder: Path) -> dict:
    return {name: (name, (folder / name).read_bytes()) for name in ("adapter_config.json", "adapter_model.safetensors")}


def test_auth_required(env):
    _, client, _, _ = env
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = client.get("/v1/adapters", headers=headers)
        err = assert_openai_error(r, 401, "Bearer")
        assert err["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"
    r = client.post("/v1/load_lora_adapter", headers={"Authorization": "Bearer nope"},
                    json={"lora_name": "x", "lora_path": "/nope"})
    assert_openai_error(r, 401)
    assert client.get("/v1/adapters").status_code == 200


def test_open_router_without_key(tmp_path):
    from fastapi.testclient import TestClient  # in-process is enough for this one

    reg = AdapterRegistry(TINY_SPEC, RegistryConfig(data_dir=tmp_path, max_loras=1, max_lora_rank=8),
                          dtype=torch.float32, device=torch.device("cpu"), base_model_name="b")
    app = FastAPI()
    app.include_router(make_admin_router(RegistryAdmin(reg), None))
    assert TestClient(app).get("/v1/adapters").json() == {"object": "list", "data": []}


def test_register_by_path_list_get_delete(env):
    registry, client, _, allowed = env
    src = write_lora_files(allowed / "a1", r=4, alpha=8, targets=["q_proj", "up_proj"])
    r = client.post("/v1/adapters", json={"id": "a1", "path": str(src)})
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["object"], body["id"], body["type"], body["rank"], body["targets"]) == \
        ("adapter", "a1", "lora", 4, ["q_proj", "up_proj"])
    assert "a1" in registry
    assert_openai_error(client.post("/v1/adapters", json={"id": "a1", "path": str(src)}), 409, "already exists")
    listed = client.get("/v1/adapters").json()
    assert listed["object"] == "list" and "a1" in [a["id"] for a in listed["data"]]
    assert client.get("/v1/adapters/a1").json()["tier"] == "host"
    r = client.delete("/v1/adapters/a1")
    assert r.status_code == 200 and r.json() == {"id": "a1", "object": "adapter", "deleted": True}
    err = assert_openai_error(client.delete("/v1/adapters/a1"), 404, "does not exist")
    assert err["code"] == "adapter_not_found"
    assert_openai_error(client.get("/v1/adapters/a1"), 404)
    assert src.is_dir()  # the source is never touched


def test_path_confinement(env, tmp_path):
    _, client, root, allowed = env
    outside = write_lora_files(root / "outside")
    (allowed / "link").symlink_to(outside, target_is_directory=True)
    sneaky = allowed / "sneaky"
    sneaky.mkdir()
    (sneaky / "adapter_config.json").write_text((outside / "adapter_config.json").read_text())
    (sneaky / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    cases = [(str(outside), 403, "outside the allowed"), (str(allowed / "link"), 403, "outside the allowed"),
             (str(allowed / ".." / "outside"), 403, "outside the allowed"),
             (str(sneaky), 403, "links outside"), ("relative/path", 400, "absolute"),
             (str(allowed / "missing"), 400, "not a directory")]
    for path, status, words in cases:
        err = assert_openai_error(client.post("/v1/adapters", json={"id": "x", "path": path}), status, words)
        assert (err["code"] == "path_not_allowed") == (status == 403) and err["param"] == "path"
        assert_openai_error(client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path}),
                            status, words)
    assert "x" not in [a["id"] for a in client.get("/v1/adapters").json()["data"]]


def test_refusals_are_openai_errors(env):
    _, client, _, allowed = env
    dora = write_lora_files(allowed / "dora", config={"use_dora": True})
    err = assert_openai_error(client.post("/v1/adapters", json={"id": "dora", "path": str(dora)}), 400, "DoRA")
    assert err["type"] == "invalid_request_error" and err["param"] == "path"
    assert_openai_error(client.post("/v1/adapters", json={"id": "../evil", "path": str(dora)}), 400, "invalid")
    assert_openai_error(client.post("/v1/adapters", json={"id": "tiny-base", "path": str(dora)}), 400, "base model")
    assert_openai_error(client.post("/v1/adapters", json={"id": "a"}), 400, "path")
    assert_openai_error(client.post("/v1/adapters", json={"id": "a", "path": "/x", "extra": 1}), 400, "extra")
    assert_openai_error(client.post("/v1/adapters", content=b"{oops",
                                    headers={"Content-Type": "application/json"}), 400)
    assert_openai_error(client.post("/v1/adapters", content=b"id=a", headers={"Content-Type": "text/plain"}), 415)


def test_multipart_upload(env, tmp_path):
    registry, client, _, _ = env
    src = write_prefix_files(tmp_path / "p", num_virtual_tokens=3)
    r = client.post("/v1/adapters", data={"id": "up1"}, files=_files(src))
    assert r.status_code == 201, r.text
    assert r.json()["type"] == "prefix" and r.json()["num_virtual_tokens"] == 3
    lease = registry.try_acquire("up1")
    assert lease.prefix_kv.shape[2] == 3
    registry.release(lease)
    assert not list(registry.scratch_dir.glob(".staging-*"))  # scratch cleaned up

    lora = write_lora_files(tmp_path / "l")
    files = {"files": ("adapter_config.json", (lora / "adapter_config.json").read_bytes()),
             "weights": ("adapter_model.safetensors", (lora / "adapter_model.safetensors").read_bytes())}
    assert client.post("/v1/adapters", data={"id": "up2"}, files=files).status_code == 201  # by filename

    pickle = {"adapter_config.json": ("adapter_config.json", b"{}"), "adapter_model.bin": ("x.bin", b"\x80\x04")}
    assert_openai_error(client.post("/v1/adapters", data={"id": "up3"}, files=pickle), 400, "never accepted")
    only_config = {"adapter_config.json": _files(lora)["adapter_config.json"]}
    err = assert_openai_error(client.post("/v1/adapters", data={"id": "up3"}, files=only_config), 400,
                              "adapter_model.safetensors is missing")
    assert "adapter at upload" in err["message"]
    assert_openai_error(client.post("/v1/adapters", files=_files(lora)), 400, "`id`")
    assert_openai_error(client.post("/v1/adapters", data={"id": "a/b"}, files=_files(lora)), 400, "invalid")
    bad = write_lora_files(tmp_path / "bad", tensors={
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.full((4, 64), float("nan"))})
    assert_openai_error(client.post("/v1/adapters", data={"id": "up3"}, files=_files(bad)), 400, "NaN")
    assert "up3" not in registry


def test_upload_size_bounded(env):
    registry, client, _, _ = env
    big = {"adapter_config.json": ("adapter_config.json", b"{}"),
           "adapter_model.safetensors": ("adapter_model.safetensors", os.urandom(LIMIT + 100 * 1024))}
    assert_openai_error(client.post("/v1/adapters", data={"id": "big"}, files=big), 413, "exceeds")

    # Chunked transfer (no Content-Length): the stream itself is cut off at the bound.
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"id\"\r\n\r\nbig\r\n--{boundary}\r\n"
            f"Content-Disposition: form-data; name=\"adapter_model.safetensors\"; "
            f"filename=\"adapter_model.safetensors\"\r\n\r\n").encode()

    def body():
        yield head
        for _ in range(LIMIT // 8192 + 20):
            yield b"\0" * 8192
        yield f"\r\n--{boundary}--\r\n".encode()

    r = client.post("/v1/adapters", content=body(),
                    headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert_openai_error(r, 413, "exceeds")
    assert "big" not in registry and not list(registry.scratch_dir.glob(".staging-*"))


def test_vllm_compatible_routes(env):
    registry, client, _, allowed = env
    src = write_lora_files(allowed / "v1")
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "vl", "lora_path": str(src), "load_inplace": False})
    assert r.status_code == 200 and "added successfully" in r.text and "vl" in registry
    assert_openai_error(client.post("/v1/load_lora_adapter", json={"lora_name": "vl", "lora_path": str(src)}), 409)
    assert_openai_error(client.post("/v1/load_lora_adapter", json={"lora_name": "vl"}), 400, "lora_path")
    r = client.post("/v1/unload_lora_adapter", json={"lora_name": "vl"})
    assert r.status_code == 200 and "removed successfully" in r.text and "vl" not in registry
    assert_openai_error(client.post("/v1/unload_lora_adapter", json={"lora_name": "vl"}), 404)
    persisted = json.loads((registry.config.data_dir / "adapter_index.json").read_text())
    assert "vl" not in [a["id"] for a in persisted["adapters"]]


def test_trainer_register_client_contract(env, tmp_path):
    """trainer/register.py against the real router: by path when allowed, else it falls back to upload."""
    register = pytest.importorskip("loramux.trainer.register")
    registry, client, _, allowed = env
    url = str(client.base_url)
    inside = write_lora_files(allowed / "tr-in")
    outside = write_lora_files(tmp_path / "tr-out")
    assert register.register_adapter(url, "tr-in", inside, admin_key=KEY)["id"] == "tr-in"
    assert register.register_adapter(url, "tr-out", outside, admin_key=KEY)["id"] == "tr-out"
    assert Path(registry.get("tr-in").source).parent == registry.scratch_dir  # both copied in
    with pytest.raises(register.RegisterError, match="401"):
        register.register_adapter(url, "tr-x", inside, admin_key="wrong")
