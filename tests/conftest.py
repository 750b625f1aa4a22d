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


# Lanes: `make test` runs every test, `make test-fast` those marked neither `e2e` nor `slow`. The marks
# are applied here, by rule, before `-m` deselects by them:
#   e2e  - the test or a fixture it uses (item.fixturenames holds them all, through fixtures of fixtures)
#          starts a real server and talks to it over a socket: it uses one of SERVER_FIXTURES, a function
#          among them calls one of SERVER_STARTERS (a module's own fixture may start its server itself), or
#          it is marked `ray`.
#   slow - the test or a fixture it uses runs the embedded model: transformers on its weights
#          (`hf_model_fp32`, the oracle of every real-model comparison), an engine built by a function
#          that takes `base_model_dir` (the model, or a checkpoint made with its tokenizer), or a module
#          fixture making peft adapters / references on it (tens of seconds of setup, shared by the module's
#          tests); or the test is in SLOW_MODULES. The other users of `base_model_dir` read its config or
#          tokenizer, or make one adapter in a test, and stay in the fast lane.
SERVER_FIXTURES = frozenset({"server_pool", "serve", "server", "client", "_ray_holder", "ray_server", "target",
                             "admin"})
SERVER_STARTERS = frozenset({"start_server", "ServerPool", "start_ray_server"})   # server_process.py, ray_cluster.py
MODEL_FIXTURES = frozenset({"hf_model_fp32"})
ENGINE_BUILDERS = frozenset({"LLMEngine", "build_engine", "AsyncEngine"})
PEFT_ON_THE_MODEL = frozenset({"make_adapters", "make_lora_adapter", "make_prefix_adapter", "load_peft_model",
                               "fresh_base_model"})   # tests/adapter_factory.py
SLOW_MODULES = frozenset({
    "test_trainer.py", "test_trainer_methods.py",   # training runs of the embedded model (~1 min per fixture)
    "test_lm_eval.py",                              # lm-evaluation-harness in a subprocess
})


def _code_names(code) -> frozenset[str]:
    """The global and attribute names a code object and the functions nested in it use."""
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= _code_names(const)
    return frozenset(names)


def _functions(item):
    """(is a fixture, argument names, names used) of the test function and of every fixture it uses."""
    funcs = [(False, item.function)] + [(True, fixturedef.func) for defs in item._fixtureinfo.name2fixturedefs.values()
                                        for fixturedef in defs]
    for is_fixture, func in funcs:
        code = getattr(func, "__code__", None)
        if code is not None:
            yield is_fixture, code.co_varnames[:code.co_argcount], _code_names(code)


def lane_marks(item) -> set[str]:
    """The lane marks `item` gets: a subset of {"e2e", "slow"}."""
    funcs = list(_functions(item))
    fixtures = set(item.fixturenames)
    marks = set()
    if (fixtures & SERVER_FIXTURES or item.get_closest_marker("ray") is not None
            or any(names & SERVER_STARTERS for _, _, names in funcs)):
        marks.add("e2e")
    if (fixtures & MODEL_FIXTURES or Path(str(item.fspath)).name in SLOW_MODULES
            or any("base_model_dir" in args and (names & ENGINE_BUILDERS or is_fixture and names & PEFT_ON_THE_MODEL)
                   for is_fixture, args, names in funcs)):
        marks.add("slow")
    return marks


@pytest.hookimpl(tryfirst=True)   # before the mark plugin's `-m` deselects by these marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        if isinstance(item, pytest.Function):
            for mark in sorted(lane_marks(item)):
                item.add_marker(mark)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """While `item` runs, a server started for it refuses to start unless it is marked e2e
    (tests.server_process.refuse_unless_e2e): the rules above missed it."""
    from tests import server_process

    server_process.running_test = item
    try:
        return (yield)
    finally:
        server_process.running_test = None
