"""Adapters get ready off the caller's thread: `try_acquire` (the engine's call) never reads a file
or writes a slot; a background thread does, started by `prefetch` when a request arrives. A tiny
ModelSpec and synthetic adapters on disk, no model."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from loramux.adapters_registry.config import RegistryConfig
from loramux.adapters_registry.errors import AdapterError
from loramux.adapters_registry.registry import AdapterRegistry
from loramux.adapters_registry.residency import LOAD_WORKERS
from loramux.adapters_registry.slots import LoraStacks
from loramux.engine.config import EngineConfig
from loramux.engine.models.spec import ModelSpec
from loramux.server.bootstrap import build_registry
from tests.adapter_factory import TINY_SPEC, write_lora_files, write_prefix_files


def make_registry(tmp_path, **kw) -> AdapterRegistry:
    cfg = RegistryConfig(data_dir=tmp_path / "data", **{"max_loras": 2, "max_lora_rank": 8, **kw})
    return AdapterRegistry(TINY_SPEC, cfg, dtype=torch.float32, device=torch.device("cpu"), base_model_name="tiny")


def wait_until(reg: AdapterRegistry, ready, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    with reg._lock:
        while not ready():
            assert time.monotonic() < deadline, "background work did not finish"
            reg.residency.wait(0.05)


def cold(tmp_path, reg: AdapterRegistry, name: str, seed: int = 0):
    """Register `name`, then push it out of the host tier (a one-entry host cache: register another)."""
    reg.register(name, write_lora_files(tmp_path / name, seed=seed))
    reg.register(f"{name}-other", write_lora_files(tmp_path / f"{name}-other", seed=seed + 100))
    assert reg.get(name).tier == "disk"


def test_try_acquire_starts_the_load_and_the_slot_copy_and_returns_at_once(tmp_path):
    reg = make_registry(tmp_path, max_host_adapters=1)
    cold(tmp_path, reg, "a")
    loads, writes = reg.residency.loads, reg.residency.slot_writes
    assert reg.try_acquire("a") is None                       # not ready: nothing read on this thread
    wait_until(reg, lambda: reg.get("a").tier == "host")
    assert reg.residency.loads == loads + 1
    assert reg.try_acquire("a") is None                       # in host memory: now its slot is written
    wait_until(reg, lambda: reg.get("a").tier == "device")
    assert reg.residency.slot_writes == writes + 1
    lease = reg.try_acquire("a")
    assert lease is not None and reg.stacks.slot_rank[lease.slot] == 4
    reg.release(lease)


def test_prefetch_loads_before_anyone_asks(tmp_path):
    reg = make_registry(tmp_path, max_host_adapters=1)
    cold(tmp_path, reg, "a")
    reg.prefetch("a")
    reg.prefetch("unknown")                                   # left to try_acquire to refuse
    wait_until(reg, lambda: reg.get("a").tier == "host")
    with pytest.raises(AdapterError) as e:
        reg.try_acquire("unknown")
    assert e.value.status == 404


def test_a_slot_being_written_is_nobodys_victim(tmp_path):
    reg = make_registry(tmp_path, max_loras=1)
    reg.register("a", write_lora_files(tmp_path / "a", seed=1))
    reg.register("b", write_lora_files(tmp_path / "b", seed=2))
    with reg._lock:                                           # a's copy cannot finish meanwhile
        assert reg.try_acquire("a") is None                   # a's copy into the only slot starts
        assert reg.try_acquire("b") is None
    wait_until(reg, lambda: not reg.residency.pending(reg._live["a"]))
    lease = reg.try_acquire("a")                              # b did not take a's slot while it was written
    assert lease is not None and reg.get("b").tier == "host"
    reg.release(lease)


def test_a_failed_background_load_fails_the_request_that_asked(tmp_path):
    reg = make_registry(tmp_path, max_host_adapters=1)
    cold(tmp_path, reg, "a")
    (reg.config.data_dir / "adapters" / "a" / "adapter_model.safetensors").write_bytes(b"garbage")
    assert reg.try_acquire("a") is None
    wait_until(reg, lambda: not reg.residency.pending(reg._live["a"]))
    with pytest.raises(AdapterError) as e:
        reg.try_acquire("a")
    assert e.value.status == 500 and "can no longer be loaded" in e.value.message
    assert reg.try_acquire("a") is None                       # the next request tries again


def test_unregistered_while_its_slot_is_written(tmp_path):
    reg = make_registry(tmp_path, max_loras=1)
    reg.register("a", write_lora_files(tmp_path / "a"))
    reg.register("b", write_lora_files(tmp_path / "b", seed=3))
    with reg._lock:                                           # a's copy cannot finish meanwhile
        assert reg.try_acquire("a") is None
        reg.unregister("a")
    lease = reg.acquire("b")                                  # the slot came back once a's copy ended
    assert lease is not None and lease.slot == 0
    reg.release(lease)


def test_a_new_registration_is_a_new_version(tmp_path):
    reg = make_registry(tmp_path)
    reg.register("a", write_lora_files(tmp_path / "a"))
    reg.register("p", write_prefix_files(tmp_path / "p"))
    first, prefix = reg.acquire("a"), reg.acquire("p")
    reg.release(first)
    reg.unregister("a")
    reg.register("a", write_lora_files(tmp_path / "a2", seed=5))
    second = reg.acquire("a")
    assert len({first.version, second.version, prefix.version}) == 3
    assert reg.acquire("a").version == second.version          # the same weights: the same version


def test_slot_count_from_the_memory_budget(base_model_dir, tmp_path):
    spec = ModelSpec.from_dir(base_model_dir)
    one = LoraStacks.slot_nbytes(spec, 8, torch.float32)
    lora_bytes = spec.num_layers * 8 * 4 * sum(sum(spec.lora_dims(m)) for m in
                                               ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"))
    fused_outputs = ((spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim    # q|k|v
                     + spec.hidden_size + 2 * spec.intermediate_size + spec.hidden_size)   # o, gate|up, down
    assert one == lora_bytes + spec.num_layers * fused_outputs * 4      # + float32 DoRA factors
    budget = EngineConfig(base_model_dir, dtype="float32", max_lora_rank=8, max_lora_memory_bytes=3 * one + one // 2)
    reg = build_registry(budget, tmp_path / "d1")
    assert reg.stacks.num_slots == 3 and reg.slot_bytes == 3 * one
    count = EngineConfig(base_model_dir, dtype="float32", max_lora_rank=8, max_lora_memory_bytes=3 * one, max_loras=5)
    assert build_registry(count, tmp_path / "d2").stacks.num_slots == 5     # --max-loras wins


def on_disk(tmp_path, reg: AdapterRegistry, name: str, seed: int) -> None:
    """Register `name` and leave its weights only on disk (out of a roomy host tier)."""
    reg.register(name, write_lora_files(tmp_path / name, seed=seed))
    with reg._lock:
        reg.residency.host.pop(reg._live[name])
    assert reg.get(name).tier == "disk"


class SlowDisk:
    """The registry's file reader, with reads of the adapters in `stuck` blocked until `release`:
    a disk that stops answering for some files."""

    def __init__(self, reg: AdapterRegistry, *stuck: str) -> None:
        self.stuck = set(stuck)
        self.started: list[str] = []                   # reads begun, in order
        self.opened = threading.Event()
        self._go = threading.Event()
        self._read = reg.residency._load
        reg.residency._load = self._load

    def _load(self, record):
        self.started.append(record.adapter_id)
        if record.adapter_id in self.stuck:
            self.opened.set()
            assert self._go.wait(60), "the slow disk was never released"
        return self._read(record)

    def release(self) -> None:
        self._go.set()


def test_a_slot_write_never_waits_behind_loads_stuck_on_a_slow_disk(tmp_path):
    """Every loader busy on a file that does not come: an adapter already in host memory still gets
    its slot written and its lease (loads and slot writes do not share one queue)."""
    reg = make_registry(tmp_path, max_host_adapters=8, max_loras=2)
    for i in range(LOAD_WORKERS + 1):
        on_disk(tmp_path, reg, f"stuck{i}", seed=10 + i)
    reg.register("warm", write_lora_files(tmp_path / "warm", seed=1))
    disk = SlowDisk(reg, *(f"stuck{i}" for i in range(LOAD_WORKERS + 1)))
    try:
        for i in range(LOAD_WORKERS + 1):
            reg.prefetch(f"stuck{i}")                         # every loader stuck, one more load queued
        assert disk.opened.wait(30)
        lease = reg.acquire("warm", timeout=30)
        assert lease is not None and reg.get("stuck0").tier == "disk"
        reg.release(lease)
    finally:
        disk.release()
    wait_until(reg, lambda: all(reg.get(f"stuck{i}").tier == "host" for i in range(LOAD_WORKERS + 1)))


def test_a_load_stuck_on_a_slow_disk_holds_up_no_other_cold_adapter(tmp_path):
    reg = make_registry(tmp_path, max_host_adapters=8, max_loras=2)
    on_disk(tmp_path, reg, "slow", seed=1)
    on_disk(tmp_path, reg, "fast", seed=2)
    disk = SlowDisk(reg, "slow")
    try:
        reg.prefetch("slow")                                  # arrived first, its file does not come
        assert disk.opened.wait(30)
        lease = reg.acquire("fast", timeout=30)               # loaded beside it and written into a slot
        assert lease is not None and reg.get("slow").tier == "disk"
        reg.release(lease)
    finally:
        disk.release()
    lease = reg.acquire("slow", timeout=30)
    assert lease is not None
    reg.release(lease)


def test_queued_requests_adapters_load_in_arrival_order_within_a_window(tmp_path):
    """Six cold adapters asked for at once, a host tier of four: two load at a time (half the tier),
    so none is pushed out of host memory before its slot is written; the rest wait their turn and
    load in the order they were asked for."""
    reg = make_registry(tmp_path, max_host_adapters=4, max_loras=2)
    names = [f"q{i}" for i in range(6)]
    for i, name in enumerate(names):
        on_disk(tmp_path, reg, name, seed=20 + i)
    disk = SlowDisk(reg, *names)
    try:
        for name in names:
            reg.prefetch(name)
        assert disk.opened.wait(30)
        time.sleep(0.2)
        with reg._lock:
            assert sorted(disk.started) == names[:2]
            assert all(reg.residency.pending(reg._live[n]) for n in names)   # deferred loads are due
    finally:
        disk.release()
    for name in names:
        lease = reg.acquire(name, timeout=60)
        assert lease is not None
        reg.release(lease)
    assert sorted(disk.started[:2]) == names[:2] and disk.started[2:6] == names[2:]
