"""Shared fixtures: the real embedded base model (converted once per machine and cached), and real
servers over real sockets: `serve(*flags)` (shared by flags), the session's `server`, `ray_server`."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as an HF safetensors directory."""
    from loramux.engine.model_source import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def hf_model_fp32(base_model_dir):
    """transformers' LlamaForCausalLM on the same weights: our oracle (float32, eval)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer(base_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model_dir)


@pytest.fixture(scope="session")
def server_pool(tmp_path_factory, base_model_dir):  # the model cached before any server looks for it
    from tests.server_process import ServerPool

    pool = ServerPool(tmp_path_factory.mktemp("servers"))
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def serve(server_pool):
    """`serve(*flags)`: a real `loramux serve` process with these flags, shared with every module that
    asks for the same flags (tests.server_process.ServerPool): leave it as you found it. It has its own
    data dir, and may register adapters by path from its `adapters_root`."""
    held = []

    def get(*flags: str):
        held.append(flags)
        return server_pool.acquire(flags)
    yield get
    for flags in held:
        server_pool.release(flags)


@pytest.fixture(scope="session")
def server(server_pool, tmp_path_factory):
    """The session's server (float32, so greedy answers are exact; no admin key), which may register
    adapters by path from anywhere under pytest's temporary directory."""
    return server_pool.acquire(("--dtype", "float32", "--max-model-len", "512", "--kv-cache-gb", "0.25",
                                "--allowed-root", str(tmp_path_factory.getbasetemp())))


@pytest.fixture(scope="session")
def _ray_holder():
    holder = SimpleNamespace(server=None)
    yield holder
    if holder.server is not None:
        holder.server.stop()


@pytest.fixture(scope="module")
def ray_server(_ray_holder, tmp_path_factory, request):
    """loramux on Ray Serve (tests.ray_cluster): one for every module marked `ray` that runs in a row, so
    Ray starts once per session; stopped after the last such module, not left idling beside other tests."""
    pytest.importorskip("ray.serve")  # the optional extra `ray`
    from tests.ray_cluster import start_ray_server

    if _ray_holder.server is None or _ray_holder.server.stopped:
        _ray_holder.server = start_ray_server(tmp_path_factory.mktemp("ray"))
    yield _ray_holder.server
    if not _marked_later(request, "ray"):
        _ray_holder.server.stop()


@pytest.fixture(scope="module", params=["single", pytest.param("ray", marks=pytest.mark.ray)])
def target(request, serve):
    """The server under test of the HTTP contract (tests.http_contract): the admin-locked single server,
    then loramux on Ray Serve with the same admin key and upload bound."""
    from tests.http_contract import Target
    from tests.server_process import LOCKED

    if request.param == "single":
        proc = serve(*LOCKED)
        return Target("single", proc.url, proc.adapters_root, proc.tmp / "data" / "adapters")
    ray = request.getfixturevalue("ray_server")
    return Target("ray", ray.url, ray.adapters_root, ray.store)


@pytest.fixture
def admin(target):
    """An httpx client of `target` holding the admin key; whatever the test registered is deleted after it."""
    import httpx

    from tests.http_contract import AUTH, ids

    with httpx.Client(base_url=target.url, headers=AUTH, timeout=120) as client:
        before = ids(client.get("/v1/adapters").json())
        yield client
        for adapter_id in ids(client.get("/v1/adapters").json()) - before:
            client.delete(f"/v1/adapters/{adapter_id}")


def _marked_later(request, marker: str) -> bool:
    """Whether a test after this module's last one carries `marker`."""
    items = request.session.items
    mine = [i for i, item in enumerate(items) if getattr(item, "module", None) is request.module]
    return bool(mine) and any(item.get_closest_marker(marker) for item in items[max(mine) + 1:])


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
