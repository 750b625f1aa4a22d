"""`register_adapter` against a fake server (httpx.MockTransport) speaking the admin-route contract."""
from __future__ import annotations

import json

import httpx
import pytest

from trainer.register import RegisterError, register_adapter


@pytest.fixture()
def adapter_dir(tmp_path):
    d = tmp_path / "codeword"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (d / "adapter_model.safetensors").write_bytes(b"\x00weights")
    return d


def error(status: int, message: str, type_: str = "invalid_request_error") -> httpx.Response:
    return httpx.Response(status, json={"error": {"message": message, "type": type_, "code": None}})


class FakeServer:
    """Records requests; `reply(request) -> Response` decides the answer."""

    def __init__(self, reply):
        self.reply, self.requests = reply, []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        return self.reply(request)


def test_registers_by_path_with_admin_key(adapter_dir, monkeypatch):
    monkeypatch.setenv("LORAMUX_ADMIN_KEY", "s3cret")
    server = FakeServer(lambda r: httpx.Response(201, json={"id": "codeword", "object": "adapter"}))
    reply = register_adapter("http://srv:8000/", "codeword", adapter_dir, transport=httpx.MockTransport(server))
    assert reply == {"id": "codeword", "object": "adapter"}
    (req,) = server.requests
    assert req.method == "POST" and str(req.url) == "http://srv:8000/v1/adapters"
    assert req.headers["authorization"] == "Bearer s3cret"
    assert json.loads(req.content) == {"id": "codeword", "path": str(adapter_dir.resolve())}


def test_no_auth_header_without_a_key(adapter_dir, monkeypatch):
    monkeypatch.delenv("LORAMUX_ADMIN_KEY", raising=False)
    server = FakeServer(lambda r: httpx.Response(200, json={"id": "codeword"}))
    register_adapter("http://srv", "codeword", adapter_dir, transport=httpx.MockTransport(server))
    assert "authorization" not in server.requests[0].headers


def test_falls_back_to_upload_when_path_not_allowed(adapter_dir):
    def reply(request):
        if request.headers["content-type"].startswith("application/json"):
            return error(403, f"adapter path {adapter_dir} is not allowed (outside --adapter-dir)")
        return httpx.Response(201, json={"id": "codeword", "uploaded": True})

    server = FakeServer(reply)
    result = register_adapter("http://srv", "codeword", adapter_dir, admin_key="k",
                              transport=httpx.MockTransport(server))
    assert result == {"id": "codeword", "uploaded": True}
    upload = server.requests[1]
    assert upload.headers["content-type"].startswith("multipart/form-data")
    assert upload.headers["authorization"] == "Bearer k"
    body = upload.content
    assert b'name="id"\r\n\r\ncodeword' in body
    for name in (b"adapter_config.json", b"adapter_model.safetensors"):
        assert b'name="' + name + b'"; filename="' + name + b'"' in body
    assert b'{"peft_type": "LORA"}' in body and b"\x00weights" in body


def test_falls_back_on_the_error_code_alone(adapter_dir):
    def reply(request):
        if request.headers["content-type"].startswith("application/json"):
            return httpx.Response(403, json={"error": {"message": "refused", "type": "permission_error",
                                                       "code": "path_not_allowed"}})
        return httpx.Response(201, json={"id": "x"})

    server = FakeServer(reply)
    assert register_adapter("http://srv", "x", adapter_dir, transport=httpx.MockTransport(server)) == {"id": "x"}
    assert len(server.requests) == 2


@pytest.mark.parametrize("status, message", [
    (409, "adapter 'codeword' already exists"),
    (400, "adapter_config.json: peft_type IA3 is not supported"),
    (401, "invalid admin key"),
])
def test_refusal_raises_with_the_server_message(adapter_dir, status, message):
    server = FakeServer(lambda r: error(status, message))
    with pytest.raises(RegisterError, match=rf"HTTP {status}\): {message}") as info:
        register_adapter("http://srv", "codeword", adapter_dir, transport=httpx.MockTransport(server))
    assert info.value.status == status
    assert len(server.requests) == 1  # only "path not allowed" is worth an upload


def test_upload_refusal_reports_the_upload_error(adapter_dir):
    def reply(request):
        if request.headers["content-type"].startswith("application/json"):
            return error(403, "path not allowed")
        return error(413, "upload too large")

    with pytest.raises(RegisterError, match="HTTP 413.*upload too large"):
        register_adapter("http://srv", "x", adapter_dir, transport=httpx.MockTransport(FakeServer(reply)))


def test_unreachable_server_and_unfinished_folder(adapter_dir, tmp_path):
    def refuse(request):
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(RegisterError, match="could not reach the loramux server at http://srv"):
        register_adapter("http://srv", "x", adapter_dir, transport=httpx.MockTransport(refuse))
    with pytest.raises(RegisterError, match="missing adapter_config.json, adapter_model.safetensors"):
        register_adapter("http://srv", "x", tmp_path / "empty")
