"""The HTTP contract of the admin routes' bodies, in both modes (see test_http_contract.py): uploads,
saved mixtures, and every refusal (bad paths, bad ids, bad adapters, bad bodies) answered alike and
changing nothing.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file, save_file

from loramux.engine.models.spec import ModelSpec
from tests.adapter_factory import write_lora_files, write_prefix_files, write_small_lora
from tests.http_contract import BASE, UPLOAD_BYTES, assert_openai_error, completion, ids

FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture(scope="module")
def spec(base_model_dir) -> ModelSpec:
    return ModelSpec.from_dir(base_model_dir)


def _files(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in FILES}


def _upload(admin: httpx.Client, adapter_id: str, files: dict[str, bytes]) -> httpx.Response:
    return admin.post("/v1/adapters", data={"id": adapter_id}, files={n: (n, data) for n, data in files.items()})


def _staging_left(target) -> list[Path]:
    return list(target.staging.glob(".staging-*"))


def test_upload(target, admin, spec, tmp_path):
    prefix = write_prefix_files(tmp_path / "p", spec, num_virtual_tokens=3)
    r = _upload(admin, "c-up-prefix", _files(prefix))
    assert r.status_code == 201, r.text
    assert (r.json()["id"], r.json()["type"], r.json()["num_virtual_tokens"]) == ("c-up-prefix", "prefix", 3)
    assert completion(target.url, "c-up-prefix").status_code == 200
    lora = write_small_lora(tmp_path / "l", spec, seed=45)
    by_filename = {"files": ("adapter_config.json", (lora / FILES[0]).read_bytes()),
                   "weights": ("adapter_model.safetensors", (lora / FILES[1]).read_bytes())}
    r = admin.post("/v1/adapters", data={"id": "c-up-lora"}, files=by_filename)
    assert r.status_code == 201, r.text
    assert r.json()["type"] == "lora" and completion(target.url, "c-up-lora").status_code == 200
    assert {"c-up-prefix", "c-up-lora"} <= ids(admin.get("/v1/adapters").json())
    assert not _staging_left(target)


def test_malformed_uploads_are_refused(target, admin, spec, tmp_path):
    good = _files(write_small_lora(tmp_path / "good", spec, seed=46))
    config, weights = good["adapter_config.json"], good["adapter_model.safetensors"]
    nan = load_file(str(tmp_path / "good" / "adapter_model.safetensors"))
    next(iter(nan.values()))[0, 0] = float("nan")
    save_file(nan, str(tmp_path / "nan.safetensors"))
    wrong_shape = write_lora_files(tmp_path / "tiny")      # another model's shapes (hidden size 64)
    cases = {
        "truncated safetensors": ({**good, "adapter_model.safetensors": weights[: len(weights) // 2]}, 400, ""),
        "header only": ({**good, "adapter_model.safetensors": weights[:8]}, 400, ""),
        "huge header length": ({**good, "adapter_model.safetensors": (2**60).to_bytes(8, "little") + b"{}"}, 400, ""),
        "not safetensors": ({**good, "adapter_model.safetensors": b"\x00" * 1024}, 400, ""),
        "wrong shapes": (_files(wrong_shape), 400, ""),
        "nan weights": ({**good, "adapter_model.safetensors": (tmp_path / "nan.safetensors").read_bytes()}, 400,
                        "NaN"),
        "pickle weights": ({"adapter_config.json": config, "adapter_model.bin": pickle.dumps({"never": 1})}, 400,
                           "never accepted"),
        "pickle beside safetensors": ({**good, "adapter_model.bin": pickle.dumps({"never": 1})}, 400, ""),
        "missing weights": ({"adapter_config.json": config}, 400, "adapter_model.safetensors is missing"),
        "missing config": ({"adapter_model.safetensors": weights}, 400, ""),
        "config not json": ({**good, "adapter_config.json": b"{peft_type: LORA"}, 400, ""),
        "config not utf-8": ({**good, "adapter_config.json": b'{"peft_type": "\xff"}'}, 400, ""),
        "config rank too high": ({**good, "adapter_config.json": json.dumps(
            {**json.loads(config), "r": 64, "lora_alpha": 128}).encode()}, 400, ""),
        "config other peft type": ({**good, "adapter_config.json": json.dumps(
            {**json.loads(config), "peft_type": "IA3"}).encode()}, 400, ""),
        "oversize": ({**good, "adapter_model.safetensors": weights + b"\x00" * (2 << 20)}, 413, "exceeds"),
        "dora": ({**good, "adapter_config.json": json.dumps({**json.loads(config), "use_dora": True}).encode()},
                 400, "DoRA"),
    }
    before = ids(admin.get("/v1/adapters").json())
    for n, (name, (files, status, words)) in enumerate(cases.items()):
        err = assert_openai_error(_upload(admin, f"c-bad-{n}", files), status, words)
        assert err["param"] != "path", (name, err)            # an upload sends files, not a path
        if name == "missing weights":
            assert "adapter at upload" in err["message"], err
    for adapter_id in ("../escape", "..", ".hidden", "a/b", "a\\b", "x" * 65, "", "%2e%2e", "nul\x00byte", BASE):
        assert_openai_error(_upload(admin, adapter_id, good), 400)
    assert_openai_error(admin.post("/v1/adapters", files={n: (n, d) for n, d in good.items()}), 400, "`id`")
    r = admin.post("/v1/adapters", content=b"--xyz\r\ngarbage",
                   headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert_openai_error(r, 400)
    assert ids(admin.get("/v1/adapters").json()) == before
    assert not _staging_left(target)


def test_upload_size_is_bounded_while_it_arrives(target, admin):
    big = {"adapter_config.json": b"{}", "adapter_model.safetensors": os.urandom(UPLOAD_BYTES + 100 * 1024)}
    assert_openai_error(_upload(admin, "c-big", big), 413, "exceeds")
    boundary = "b0undary"        # chunked (no Content-Length): cut off as the bytes pass the bound
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"id\"\r\n\r\nc-big\r\n--{boundary}\r\n"
            f"Content-Disposition: form-data; name=\"adapter_model.safetensors\"; "
            f"filename=\"adapter_model.safetensors\"\r\n\r\n").encode()

    def body():
        yield head
        for _ in range(UPLOAD_BYTES // 8192 + 20):
            yield b"\0" * 8192
        yield f"\r\n--{boundary}--\r\n".encode()
    r = admin.post("/v1/adapters", content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert_openai_error(r, 413, "exceeds")
    assert "c-big" not in ids(admin.get("/v1/adapters").json()) and not _staging_left(target)


def test_save_mixture(target, admin, spec):
    for i, adapter_id in enumerate(("c-mix-a", "c-mix-b")):
        src = write_small_lora(target.adapters_root / adapter_id, spec, seed=47 + i)
        assert admin.post("/v1/adapters", json={"id": adapter_id, "path": str(src)}).status_code == 201
    mixture = {"adapters": [{"id": "c-mix-a", "weight": 0.7}, {"id": "c-mix-b", "weight": 0.6}], "merge": "linear"}
    per_request = completion(target.url, BASE, max_tokens=8, ignore_eos=True, **mixture)
    assert per_request.status_code == 200, per_request.text
    r = admin.post("/v1/adapters", json={"id": "c-blend", "mixture": mixture})
    assert r.status_code == 201, r.text
    assert (r.json()["id"], r.json()["type"]) == ("c-blend", "lora")
    assert "c-blend" in ids(httpx.get(f"{target.url}/v1/models", timeout=60).json())
    saved = completion(target.url, "c-blend", max_tokens=8, ignore_eos=True)
    assert saved.json()["choices"] == per_request.json()["choices"]      # the same merged weights

    assert_openai_error(admin.post("/v1/adapters", json={"id": "c-blend", "mixture": mixture}), 409,
                        "already exists")
    unknown = {"adapters": [{"id": "c-mix-a"}, {"id": "c-no-such"}]}
    err = assert_openai_error(admin.post("/v1/adapters", json={"id": "c-blend-2", "mixture": unknown}), 404)
    assert (err["code"], err["param"]) == ("adapter_not_found", "mixture.adapters")
    err = assert_openai_error(admin.post("/v1/adapters", json={"id": "c-blend-2", "mixture": {
        **mixture, "merge": "magic"}}), 400)
    assert err["param"] == "mixture.merge"
    assert admin.delete("/v1/adapters/c-mix-a").status_code == 200
    again = completion(target.url, "c-blend", max_tokens=8, ignore_eos=True)      # a copy: its source may go
    assert again.json()["choices"] == per_request.json()["choices"]
    assert "c-blend-2" not in ids(admin.get("/v1/adapters").json())


def test_register_by_path_is_confined_to_the_allowed_roots(target, admin, spec, tmp_path):
    root = target.adapters_root
    outside = write_small_lora(tmp_path / "outside", spec, seed=3)
    link = root / "c-link-out"
    link.symlink_to(outside, target_is_directory=True)
    sneaky = root / "c-sneaky"
    sneaky.mkdir()
    (sneaky / "adapter_config.json").write_bytes((outside / "adapter_config.json").read_bytes())
    (sneaky / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    cases = [(str(outside), 403, "outside the allowed"), (str(link), 403, "outside the allowed"),
             (str(root / ".." / "data"), 403, ""), (str(root / os.path.relpath(outside, root)), 403, "outside the allowed"),
             (str(sneaky), 403, "links outside"), ("/etc", 403, ""), ("~/", 403, ""), ("relative/path", 400, "absolute"),
             (str(root / "c-missing"), 400, "not a directory"), ("", 400, "")]
    for path, status, words in cases:
        for route, body in (("/v1/adapters", {"id": "c-conf", "path": path}),
                            ("/v1/load_lora_adapter", {"lora_name": "c-conf", "lora_path": path})):
            err = assert_openai_error(admin.post(route, json=body), status, words)
            assert (err["code"] == "path_not_allowed") == (status == 403), (path, err)
            assert err["param"] == ("path" if route == "/v1/adapters" else "lora_path"), (route, path, err)
    assert_openai_error(admin.post("/v1/adapters", content=b'{"id": "c-conf", "path": "/tmp/\\u0000x"}',
                                   headers={"content-type": "application/json"}), 400)
    assert "c-conf" not in ids(admin.get("/v1/adapters").json())


def test_refusals_are_openai_errors(target, admin, spec):
    dora = write_lora_files(target.adapters_root / "c-dora", spec, r=2, alpha=4, config={"use_dora": True})
    err = assert_openai_error(admin.post("/v1/adapters", json={"id": "c-dora", "path": str(dora)}), 400, "DoRA")
    assert err["type"] == "invalid_request_error" and err["param"] == "path"
    pickled = target.adapters_root / "c-pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_bytes((dora / "adapter_config.json").read_bytes())
    (pickled / "adapter_model.bin").write_bytes(pickle.dumps({"never": "unpickled"}))
    assert_openai_error(admin.post("/v1/adapters", json={"id": "c-pickled", "path": str(pickled)}), 400, "pickle")
    assert_openai_error(admin.post("/v1/adapters", json={"id": "../evil", "path": str(dora)}), 400, "invalid")
    assert_openai_error(admin.post("/v1/adapters", json={"id": BASE, "path": str(dora)}), 400, "base model")
    cases = [(b'{"id": "x"}', "invalid_value", "path"), (b'{"id": 5, "path": "/x"}', "invalid_value", "id"),
             (b'{"id": "a", "path": "/x", "extra": 1}', "invalid_value", "extra"),
             (b"{oops", "invalid_json", None),
             (b'{"id": "x", "path": ' + b"[" * 300 + b"]" * 300 + b"}", "json_too_complex", None),
             (b'{"id": "x", "mixture": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "json_too_complex", None)]
    for body, code, param in cases:
        err = assert_openai_error(admin.post("/v1/adapters", content=body,
                                             headers={"content-type": "application/json"}), 400)
        assert (err["code"], err["param"]) == (code, param), (body[:60], err)
    err = assert_openai_error(admin.post("/v1/load_lora_adapter", content=b'{"lora_name": "\xff"',
                                         headers={"content-type": "application/json"}), 400)
    assert err["code"] == "invalid_json"
    assert_openai_error(admin.post("/v1/adapters", content=b"id=a", headers={"content-type": "text/plain"}), 415)
    assert not {"c-dora", "c-pickled", "x", "a"} & ids(admin.get("/v1/adapters").json())
