"""loramux on Ray Serve (server/ray_app.py): 2 engine replicas behind one endpoint, on a local Ray
(the session's `ray_server`, tests.ray_cluster).

Every answer must equal the single-server answer (the session's `loramux serve` process, float32 and
greedy on both sides), requests for an adapter must land on the replica holding it, adapter
deletes must reach every replica, and killing a replica mid-load must lose no request. That every
route answers as the single server's does: test_http_contract*.py.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import time

import httpx
import pytest

from loramux.engine.models.spec import ModelSpec
from tests.adapter_factory import write_small_lora
from tests.http_contract import AUTH
from tests.ray_cluster import PER_REPLICA

pytest.importorskip("ray.serve")  # the optional extra `ray`
pytestmark = pytest.mark.ray

BASE = "SmolLM2-135M-Instruct"
IDS = [f"ray-{i}" for i in range(8)]
NEW = "ray-new"                 # other weights, registered later under an existing id
PROMPTS = ("The weather today is", "My favourite food is")
MAX_TOKENS = 4                  # the kill test's 7 adapters (IDS[1:]) overflow PER_REPLICA, Serve's multiplexing LRU


def complete(url: str, model: str, prompt: str, retries: int = 0) -> tuple[int, str, str | None, int]:
    """(status, text or error body, replica, re-sends by the ingress and by us). Retries on 5xx and
    connection errors, as a client of a server that may lose a replica may."""
    r, resent = None, 0
    for attempt in range(retries + 1):
        try:
            r = httpx.post(f"{url}/v1/completions", timeout=120, json={
                "model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})
            resent += int(r.headers.get("x-loramux-retries", 0))
            if r.status_code < 500:
                break
        except httpx.TransportError:
            r = None
        if attempt < retries:
            resent += 1
            time.sleep(1)
    if r is None:
        return 0, "connection failed", None, resent
    text = r.json()["choices"][0]["text"] if r.status_code == 200 else r.text
    return r.status_code, text, r.headers.get("x-loramux-replica"), resent


def chat(url: str, model: str, stream: bool = False) -> str:
    """A greedy chat answer; streamed, the deltas joined."""
    body = {"model": model, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "stream": stream}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    if not stream:
        return r.json()["choices"][0]["message"]["content"]
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])


def ask_all(url: str, jobs: list[tuple[str, str]], retries: int = 0) -> list[tuple[int, str, str | None, int]]:
    with cf.ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda job: complete(url, *job, retries=retries), jobs))


@pytest.fixture(scope="module")
def lora_root(ray_server, base_model_dir):
    root = ray_server.adapters_root / "test_http_ray"      # where Ray (and the session server) may register from
    spec = ModelSpec.from_dir(base_model_dir)
    for i, adapter_id in enumerate([*IDS, NEW]):
        write_small_lora(root / adapter_id, spec, seed=3000 + i)
    return root


@pytest.fixture(scope="module")
def reference(server, lora_root) -> dict[tuple[str, str], str]:
    """The single server's answer to every (model, prompt), and to one chat."""
    models = [*IDS, NEW]
    for adapter_id in models:
        r = httpx.post(f"{server.url}/v1/adapters", json={"id": adapter_id, "path": str(lora_root / adapter_id)},
                       timeout=60)
        assert r.status_code == 201, r.text
    jobs = [(m, p) for m in [BASE, *models] for p in PROMPTS]
    try:
        results = ask_all(server.url, jobs)
        chat_answer = chat(server.url, IDS[-1])
    finally:  # the session's server: leave it as we found it
        for adapter_id in models:
            httpx.delete(f"{server.url}/v1/adapters/{adapter_id}", timeout=60)
    assert all(status == 200 for status, *_ in results), results
    answers = {("chat", IDS[-1]): chat_answer, **{job: text for job, (_, text, _, _) in zip(jobs, results)}}
    assert len({answers[m, PROMPTS[0]] for m in [BASE, *IDS, NEW]}) > 6   # the adapters really differ
    return answers


def replicas(url: str) -> list[dict]:
    return httpx.get(f"{url}/v1/replicas", timeout=60).json()["data"]


def holders(url: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for rep in replicas(url):
        for a in rep["adapters"]:
            out.setdefault(a["id"], set()).add(rep["replica"])
    return out


def test_answers_equal_single_server(ray_server, lora_root, reference):
    url = ray_server.url
    for adapter_id in IDS:
        r = httpx.post(f"{url}/v1/adapters", json={"id": adapter_id, "path": str(lora_root / adapter_id)},
                       headers=AUTH, timeout=60)
        assert r.status_code == 201, r.text
    assert {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]} == {BASE, *IDS}
    time.sleep(1.0)   # Serve's routers learn which replica holds which adapter (pushed every 0.1 s)
    jobs = [(m, p) for m in [BASE, *IDS] for p in PROMPTS]
    got = dict(zip(jobs, ask_all(url, jobs)))
    for job, (status, text, replica, _) in got.items():
        assert status == 200, (job, text)
        assert text == reference[job], job
        assert replica is not None
    assert len({replica for _, _, replica, _ in got.values()}) == 2       # both replicas serve
    assert complete(url, "no-such-adapter", PROMPTS[0])[0] == 404
    assert chat(url, IDS[-1]) == chat(url, IDS[-1], stream=True) == reference["chat", IDS[-1]]


def test_requests_land_on_the_replica_holding_the_adapter(ray_server, reference):
    url = ray_server.url
    before = holders(url)
    # Which adapters are still resident is up to Serve: the previous test's concurrent first requests
    # may load one adapter on both replicas, and a replica's 7th adapter evicts its least recent one.
    # Requests for a resident adapter load nothing, so the holders stay put while these run.
    held = [i for i in IDS if i in before]
    assert len(held) >= PER_REPLICA, before   # all 8 held, or a replica evicted one and so holds PER_REPLICA
    counts = {rep["replica"]: rep["requests_by_model"] for rep in replicas(url)}
    jobs = [(adapter_id, PROMPTS[0]) for adapter_id in held] * 2
    for (adapter_id, prompt), (status, text, replica, _) in zip(jobs, ask_all(url, jobs)):
        assert status == 200 and text == reference[adapter_id, prompt]
        assert replica in before[adapter_id], (adapter_id, replica, before[adapter_id])
    after = {rep["replica"]: rep["requests_by_model"] for rep in replicas(url)}
    for adapter_id in held:   # the replica metrics agree with the response headers
        served = {r: after[r].get(adapter_id, 0) - counts.get(r, {}).get(adapter_id, 0) for r in after}
        assert sum(served.values()) == 2
        assert {r for r, n in served.items() if n} <= before[adapter_id]


def test_ingress_bounds_and_checks_bodies(ray_server):
    """The Ray ingress bounds bodies (chunked too) and parses them as the single server does; a
    prompt that cannot fit is refused by its replica before tokenizing."""
    url = ray_server.url
    huge = json.dumps({"model": BASE, "prompt": "a " * 1_500_000}).encode()    # 3 MB: over the 2 MiB default

    def chunks():
        for i in range(0, len(huge), 1 << 16):
            yield huge[i:i + (1 << 16)]
    cases = [(huge, 413, "request_too_large"), (chunks(), 413, "request_too_large"),
             (b"[" * 100_000 + b"]" * 100_000, 400, "json_too_complex"),
             (b'{"model": "x", "prompt": "\xff"}', 400, "invalid_json"),
             (json.dumps({"model": BASE, "prompt": "hi", "max_tokens": True}).encode(), 400, "invalid_value"),
             (json.dumps({"model": BASE, "prompt": "a " * 500_000}).encode(), 400, "context_length_exceeded")]
    for body, status, code in cases:
        r = httpx.post(f"{url}/v1/completions", content=body, headers={"content-type": "application/json"},
                       timeout=120)
        assert r.status_code == status and r.json()["error"]["code"] == code, r.text[:300]
    assert complete(url, BASE, PROMPTS[0])[0] == 200


def test_metrics_per_replica(ray_server):
    text = httpx.get(f"{ray_server.url}/metrics", timeout=60).text
    for rep in replicas(ray_server.url):
        assert f'replica="{rep["replica"]}"' in text
    assert "loramux_requests_total{" in text


def test_delete_reaches_every_replica_and_versions_are_checked(ray_server, lora_root, reference):
    from loramux.adapters_registry.store import AdapterStore

    url, victim = ray_server.url, IDS[0]
    assert complete(url, victim, PROMPTS[0])[1] == reference[victim, PROMPTS[0]]
    assert httpx.delete(f"{url}/v1/adapters/{victim}", headers=AUTH, timeout=60).status_code == 200
    assert victim not in holders(url)                           # broadcast: no replica holds it any more
    assert complete(url, victim, PROMPTS[0])[0] == 404
    assert httpx.delete(f"{url}/v1/adapters/{victim}", headers=AUTH, timeout=60).status_code == 404
    # Registered again under the same id with other weights: served with the new weights.
    r = httpx.post(f"{url}/v1/adapters", json={"id": victim, "path": str(lora_root / NEW)}, headers=AUTH,
                   timeout=60)
    assert r.status_code == 201, r.text
    assert complete(url, victim, PROMPTS[1])[1] == reference[NEW, PROMPTS[1]]
    # Replaced behind the replicas' backs (no broadcast): the version check on use still catches it.
    other = IDS[1]
    assert complete(url, other, PROMPTS[0])[1] == reference[other, PROMPTS[0]]
    store = AdapterStore(ray_server.store)
    store.delete(other)
    store.put(other, lora_root / NEW)
    for prompt in PROMPTS:
        assert complete(url, other, prompt)[1] == reference[NEW, prompt]
    store.delete(other)                                         # restore for the next test
    store.put(other, lora_root / other)


def test_killing_a_replica_mid_load_loses_no_request(ray_server, reference):
    import ray

    url = ray_server.url
    victim = replicas(url)[0]
    jobs = [(m, p) for m in IDS[1:] for p in PROMPTS]
    with cf.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(complete, url, m, p, 3) for m, p in jobs]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:   # kill it while it has requests running
            if next(r for r in replicas(url) if r["replica"] == victim["replica"])["running"]:
                break
            time.sleep(0.05)
        in_flight = sum(not f.done() for f in futures)
        ray.kill(ray.get_actor(victim["actor_name"], namespace="serve"), no_restart=True)
        results = [f.result() for f in futures]
    for (model, prompt), (status, text, _, _) in zip(jobs, results):
        assert status == 200, (model, text)
        assert text == reference[model, prompt], model
    resent = sum(r[3] for r in results)
    print(f"killed {victim['replica']} with {in_flight} of {len(jobs)} requests in flight; {resent} re-sent")
    assert in_flight > 0 and resent > 0
    deadline = time.monotonic() + 10
    while True:     # the survivor served all 7 adapters but holds at most PER_REPLICA: LRU unloads reach the registry
        live = replicas(url)
        if max(len(rep["adapters"]) for rep in live) <= PER_REPLICA or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert victim["replica"] not in {rep["replica"] for rep in live}
    assert max(len(rep["adapters"]) for rep in live) <= PER_REPLICA, live
