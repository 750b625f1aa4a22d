"""200 adapters registered over HTTP on a server with far fewer device slots: every answer exact.

Each adapter's answer in a mixed, concurrent load must equal its answer when it runs alone.
"""
from __future__ import annotations

import concurrent.futures as cf

import httpx

from loramux.engine.models.spec import ModelSpec
from tests.adapter_factory import write_small_lora

NUM_ADAPTERS = 200


def test_200_adapters_through_http_with_fewer_slots(server, client, base_model_dir):
    spec = ModelSpec.from_dir(base_model_dir)
    ids = [f"bulk-{i:03d}" for i in range(NUM_ADAPTERS)]
    for i, adapter_id in enumerate(ids):
        path = server.adapters_root / adapter_id
        write_small_lora(path, spec, seed=1000 + i)
        r = httpx.post(f"{server.url}/v1/adapters", json={"id": adapter_id, "path": str(path)}, timeout=30)
        assert r.status_code in (200, 201), r.text
    try:
        listed = {m.id for m in client.models.list().data}
        assert set(ids) <= listed

        def ask(adapter_id: str) -> str:
            return client.completions.create(model=adapter_id, prompt="The weather today is", max_tokens=4,
                                             temperature=0).choices[0].text

        with cf.ThreadPoolExecutor(16) as pool:              # mixed load: 16 in flight over 200 adapters
            mixed = dict(zip(ids, pool.map(ask, ids)))
        alone = {adapter_id: ask(adapter_id) for adapter_id in ids}
        assert mixed == alone
        assert len(set(alone.values())) > 20                # the adapters really differ
        base = client.completions.create(model="SmolLM2-135M-Instruct", prompt="The weather today is",
                                         max_tokens=4, temperature=0).choices[0].text
        assert sum(text != base for text in alone.values()) > NUM_ADAPTERS // 2
        tiers = {a["id"]: a["tier"] for a in httpx.get(f"{server.url}/v1/adapters").json()["data"]}
        metrics = httpx.get(f"{server.url}/metrics").text
        slots = int(float(next(line.split()[-1] for line in metrics.splitlines()
                               if line.startswith("loramux_adapter_slots "))))
        assert slots < NUM_ADAPTERS // 4
        assert sum(tiers[i] == "device" for i in ids) <= slots
    finally:
        for adapter_id in ids:
            httpx.delete(f"{server.url}/v1/adapters/{adapter_id}")
