"""Cold adapters beside resident ones on the real model (float32: greedy answers are exact): a load
stuck on a slow disk stalls no other request, and every request of a run that cycles more adapters
than slots answers what it answers alone."""
from __future__ import annotations

import time

from loramux.engine.config import EngineConfig
from loramux.engine.models.spec import ModelSpec
from loramux.engine.sampling_params import SamplingParams
from loramux.server.bootstrap import build_engine
from tests.adapter_factory import write_small_lora
from tests.test_registry_loading import SlowDisk

PROMPTS = ["The harbour at dawn", "A recipe for bread:", "Dear committee,", "The train was late because"]


def test_a_load_stuck_on_a_slow_disk_stalls_no_request_and_each_answers_as_alone(base_model_dir, tmp_path):
    spec = ModelSpec.from_dir(base_model_dir)
    folders = {f"c{i}": write_small_lora(tmp_path / f"c{i}", spec, seed=500 + i, r=4) for i in range(5)}
    econf = EngineConfig(base_model_dir, dtype="float32", kv_cache_bytes=32 << 20, max_loras=2, max_lora_rank=8,
                         max_num_seqs=8, max_model_len=128)
    engine, registry = build_engine(econf, tmp_path / "data", folders)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    # c0 first (its file does not come), then 12 requests cycling 4 more adapters over the 2 slots and the base.
    jobs = [("c0", PROMPTS[0])] + [([None, "c1", "c2", "c3", "c4"][k % 5], PROMPTS[k % 4]) for k in range(12)]
    with registry._lock:
        for adapter_id in folders:                       # every adapter cold: only on disk
            registry.residency.host.pop(registry._live[adapter_id])
    disk = SlowDisk(registry, "c0")
    try:
        seqs = [engine.add_request(f"r{k}", engine.tokenizer(p)["input_ids"], params, a)[0]
                for k, (a, p) in enumerate(jobs)]
        deadline = time.monotonic() + 180
        while any(not s.is_finished for s in seqs[1:]):
            assert time.monotonic() < deadline, "requests behind the stuck load did not finish"
            if not engine.step():
                time.sleep(0.005)                        # adapters loading in the background
        assert disk.opened.is_set() and not seqs[0].is_finished and registry.get("c0").tier == "disk"
    finally:
        disk.release()
    while engine.has_work:
        if not engine.step():
            time.sleep(0.005)
    together = [s.output_token_ids for s in seqs]
    alone = [engine.generate([engine.tokenizer(p)["input_ids"]], params, [a])[0].output_token_ids for a, p in jobs]
    assert together == alone
    assert len({tuple(t) for t, (a, _) in zip(together, jobs) if a is not None}) > 1   # the adapters differ
