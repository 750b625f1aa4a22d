"""Registry unit tests with no model at all: a tiny ModelSpec and synthetic adapters on disk."""
from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loramux.adapters_registry.catalog import INDEX_FILE, Catalog, CatalogError
from loramux.adapters_registry.config import RegistryConfig
from loramux.adapters_registry.errors import AdapterError
from loramux.adapters_registry.host_cache import LruCache
from loramux.adapters_registry.ids import validate_adapter_id
from loramux.adapters_registry.registry import AdapterRegistry
from loramux.adapters_registry.slots import SlotTable
from tests.adapter_factory import TINY_SPEC, _lora_key, write_lora_files, write_prefix_files

BASE = "tiny-base"


def make_registry(tmp_path: Path, **kw) -> AdapterRegistry:
    cfg = RegistryConfig(data_dir=tmp_path / "data", **{"max_loras": 2, "max_lora_rank": 8, **kw})
    return AdapterRegistry(TINY_SPEC, cfg, dtype=torch.float32, device=torch.device("cpu"), base_model_name=BASE)


def snapshot(reg: AdapterRegistry) -> tuple:
    """Everything a failed registration must leave untouched."""
    data = reg.config.data_dir
    return ([i.to_dict() for i in reg.list()], sorted(p.name for p in (data / "adapters").iterdir()),
            (data / INDEX_FILE).read_text() if (data / INDEX_FILE).exists() else None)


# -- ids ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("good", ["a", "my-adapter_v1.2", "A" * 64, "x.y", "-_-"])
def test_valid_ids(good):
    assert validate_adapter_id(good, BASE) == good


@pytest.mark.parametrize("bad", ["", "a" * 65, "../etc", "a/b", "a b", "..", ".", ".hidden", "x..y", "é", BASE,
                                 None, 3, "a\x00"])
def test_invalid_ids(bad):
    with pytest.raises(AdapterError) as e:
        validate_adapter_id(bad, BASE)
    assert e.value.status == 400 and e.value.param == "id"


# -- small pieces ---------------------------------------------------------------------------------
def test_lru_cache_evicts_least_recent():
    c = LruCache(2)
    c.put("a", 1)
    c.put("b", 2)
    c.get("a")
    assert c.put("c", 3) == ["b"]
    assert "a" in c and "c" in c and len(c) == 2


def test_slot_table_prefers_free_then_lru_idle():
    t = SlotTable(3)
    busy = {"x": True, "y": False, "z": False}
    for s, o in enumerate("xyz"):
        assert t.victim(lambda o: not busy[o]) == s
        t.assign(s, o)
    t.touch(1)  # y recently used: z (slot 2) is now the LRU idle slot
    assert t.victim(lambda o: not busy[o]) == 2
    t.free(0)
    assert t.victim(lambda o: not busy[o]) == 0
    assert SlotTable(1).victim(lambda o: False) == 0


def test_registry_config_validates(tmp_path):
    with pytest.raises(ValueError, match="max_loras"):
        RegistryConfig(data_dir=tmp_path, max_loras=0, max_lora_rank=8)
    config = RegistryConfig(data_dir=str(tmp_path), max_loras=2, max_lora_rank=8, allowed_roots=(str(tmp_path),))
    assert config.allowed_roots == (tmp_path.resolve(),)


# -- catalog --------------------------------------------------------------------------------------
def test_catalog_persists_and_removes(tmp_path):
    src = write_lora_files(tmp_path / "src")
    cat = Catalog(tmp_path / "data")
    staged = cat.stage(src)
    entry = cat.add("a1", staged, staged=True)
    assert entry.path == tmp_path / "data" / "adapters" / "a1" and (entry.path / "adapter_config.json").is_file()
    index = json.loads((tmp_path / "data" / INDEX_FILE).read_text())
    assert index["adapters"][0]["path"] == "adapters/a1"  # relative: the data dir can move
    cat.add("ref", src, staged=False)
    (tmp_path / "data" / "adapters" / ".staging-leftover").mkdir()
    cat2 = Catalog(tmp_path / "data")  # a restart
    assert {e.adapter_id for e in cat2.entries()} == {"a1", "ref"}
    assert not (tmp_path / "data" / "adapters" / ".staging-leftover").exists()
    cat2.remove("a1")
    cat2.remove("ref")
    assert not (tmp_path / "data" / "adapters" / "a1").exists() and src.exists()  # source never touched
    assert Catalog(tmp_path / "data").entries() == []


def test_catalog_refuses_corrupt_index(tmp_path):
    (tmp_path / INDEX_FILE).write_text("{not json")
    with pytest.raises(CatalogError, match="unreadable"):
        Catalog(tmp_path)


# -- registration ---------------------------------------------------------------------------------
def test_register_copies_and_survives_restart(tmp_path):
    src = write_lora_files(tmp_path / "src", r=4, alpha=8, targets=["q_proj", "down_proj"])
    reg = make_registry(tmp_path)
    info = reg.register("a1", src)
    assert (info.type, info.rank, info.alpha, info.targets, info.tier) == ("lora", 4, 8.0, ("q_proj", "down_proj"),
                                                                          "host")
    assert info.size_bytes == (src / "adapter_model.safetensors").stat().st_size
    for f in src.iterdir():
        f.unlink()
    src.rmdir()  # deleting the source does not break the copy
    reg2 = make_registry(tmp_path)
    assert [i.id for i in reg2.list()] == ["a1"] and reg2.get("a1").tier == "disk"
    lease = reg2.acquire("a1")
    assert lease.slot >= 0 and reg2.get("a1").tier == "device"
    reg2.release(lease)


def test_register_without_copy_and_preload(tmp_path):
    root = tmp_path / "adapters"
    write_lora_files(root / "one")
    write_prefix_files(root / "two")
    (root / ".git").mkdir()
    reg = make_registry(tmp_path)
    infos = reg.preload_dir(root)
    assert [(i.id, i.type) for i in infos] == [("one", "lora"), ("two", "prefix")]
    assert Path(reg.get("one").source) == (root / "one").resolve()
    ref = reg.register("ref", root / "one", copy=False)
    assert Path(ref.source) == (root / "one").resolve()
    reg2 = make_registry(tmp_path)  # preloaded ones are not persisted; the referenced one is
    assert [i.id for i in reg2.list()] == ["ref"]


def test_duplicate_and_base_name(tmp_path):
    src = write_lora_files(tmp_path / "src")
    reg = make_registry(tmp_path)
    reg.register("a1", src)
    before = snapshot(reg)
    with pytest.raises(AdapterError) as e:
        reg.register("a1", src)
    assert e.value.status == 409
    with pytest.raises(AdapterError) as e:
        reg.register(BASE, src)
    assert e.value.status == 400 and "base model" in e.value.message
    assert snapshot(reg) == before


REFUSALS = [
    # (what to write, expected status, words the message must contain)
    (lambda d: write_lora_files(d, config={"use_dora": True}), 400, "DoRA"),
    (lambda d: write_lora_files(d, config={"peft_type": "IA3"}), 400, "IA3"),
    (lambda d: write_lora_files(d, config={"bias": "all"}), 400, "bias"),
    (lambda d: write_lora_files(d, config={"modules_to_save": ["lm_head"]}), 400, "modules_to_save"),
    (lambda d: write_lora_files(d, config={"init_lora_weights": "pissa"}), 400, "pissa"),
    (lambda d: write_lora_files(d, config={"some_future_variant": {"x": 1}}), 400, "some_future_variant"),
    (lambda d: write_lora_files(d, targets=["embed_tokens"]), 400, "embed_tokens"),
    (lambda d: write_lora_files(d, targets=["lm_head"]), 400, "lm_head"),
    (lambda d: write_lora_files(d, targets=["c_attn"]), 400, "c_attn"),
    (lambda d: write_lora_files(d, config={"target_modules": ".*"}), 400, "loramux applies LoRA only"),
    (lambda d: write_lora_files(d, config={"target_modules": "(a+)+b"}), 400, "too complex"),
    (lambda d: write_lora_files(d, r=16), 400, "exceeds the server's maximum rank 8"),
    (lambda d: write_lora_files(d, config={"r": 2}), 400, "dimension mismatch"),
    (lambda d: write_lora_files(d, config={"layers_to_transform": [7]}), 400, "match no module"),
    (lambda d: write_lora_files(d, tensors={"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                                            torch.randn(4, 32)}), 400, "dimension mismatch"),
    (lambda d: write_lora_files(d, tensors={"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                                            torch.full((4, 64), math.nan)}), 400, "NaN or Inf"),
    (lambda d: write_lora_files(d, targets=["up_proj"], tensors={
        "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight": torch.tensor([math.inf] * 512).view(128, 4)}),
     400, "up_proj.lora_B.weight contains NaN or Inf"),
    (lambda d: write_lora_files(d, tensors={"base_model.model.model.layers.1.mlp.up_proj.lora_B.weight":
                                            torch.ones(128, 4)}), 400, "does not match the adapter's config"),
    (lambda d: write_lora_files(d, tensors={"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector":
                                            torch.ones(64)}), 400, "DoRA"),
    (lambda d: write_lora_files(d, tensors={"base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight":
                                            torch.ones(4, 64)}), 400, "layer 5"),
    (lambda d: write_lora_files(d, tensors={"base_model.model.lm_head.weight": torch.ones(2, 2)}), 400, "lm_head"),
    (lambda d: write_lora_files(d, drop=["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]),
     400, "missing"),
    (lambda d: write_lora_files(d, tensors={"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                                            torch.ones(4, 64, dtype=torch.int32)}), 400, "floating point"),
    (lambda d: write_prefix_files(d, config={"num_layers": 3}), 400, "3 layers"),
    (lambda d: write_prefix_files(d, config={"num_attention_heads": 4, "token_dim": 64}), 400, "KV heads"),
    (lambda d: write_prefix_files(d, config={"num_transformer_submodules": 2}), 400, "encoder-decoder"),
    (lambda d: write_prefix_files(d, config={"num_virtual_tokens": 5}), 400, "prompt_embeddings"),
    (lambda d: write_prefix_files(d, num_virtual_tokens=600, config={}), 400, "num_virtual_tokens 600"),
]


@pytest.mark.parametrize("case", range(len(REFUSALS)))
def test_refusals_name_the_problem_and_change_nothing(tmp_path, case):
    write, status, words = REFUSALS[case]
    reg = make_registry(tmp_path)
    reg.register("keep", write_lora_files(tmp_path / "keep"))
    before = snapshot(reg)
    src = write(tmp_path / "bad")
    with pytest.raises(AdapterError) as e:
        reg.register("bad", src)
    assert e.value.status == status and words in e.value.message, e.value.message
    assert str(src) in e.value.message  # says which adapter
    assert snapshot(reg) == before and "bad" not in reg


def test_file_level_refusals(tmp_path):
    reg = make_registry(tmp_path)
    before = snapshot(reg)
    src = write_lora_files(tmp_path / "pickle")
    (src / "adapter_model.safetensors").rename(src / "adapter_model.bin")
    trunc = write_lora_files(tmp_path / "trunc")
    data = (trunc / "adapter_model.safetensors").read_bytes()
    (trunc / "adapter_model.safetensors").write_bytes(data[: len(data) - 100])
    noconf = write_lora_files(tmp_path / "noconf")
    (noconf / "adapter_config.json").unlink()
    badjson = write_lora_files(tmp_path / "badjson")
    (badjson / "adapter_config.json").write_text("{oops")
    cases = [(src, "never unpickles"), (trunc, "truncated"), (noconf, "adapter_config.json is missing"),
             (badjson, "not valid JSON"), (tmp_path / "nowhere", "not a directory")]
    for path, words in cases:
        with pytest.raises(AdapterError) as e:
            reg.register("bad", path)
        assert e.value.status == 400 and words in e.value.message, e.value.message
    assert snapshot(reg) == before


def test_scales_rslora_and_dtypes(tmp_path):
    reg = make_registry(tmp_path)
    plain = write_lora_files(tmp_path / "p", r=4, alpha=8)
    rs = write_lora_files(tmp_path / "r", r=4, alpha=8, rslora=True, dtype=torch.bfloat16)
    reg.register("plain", plain)
    reg.register("rs", rs)
    lp, lr = reg.acquire("plain"), reg.acquire("rs")
    s = reg.stacks
    key = _lora_key(0, "q_proj", "B")
    # The scale is folded into the stacked B: alpha / r = 2, and alpha / sqrt(r) = 4 with rslora.
    for lease, folder, scale in ((lp, plain, 2.0), (lr, rs, 4.0)):
        B = load_file(str(folder / "adapter_model.safetensors"))[key].float()
        assert torch.equal(s.B[0]["q_proj"][lease.slot, :, :4], B * scale)
        assert s.B[0]["q_proj"][lease.slot, :, 4:].abs().sum() == 0 and s.A[0]["q_proj"][lease.slot, 4:].abs().sum() == 0
    assert s.A[0]["k_proj"][lp.slot].abs().sum() == 0 and s.B[1]["k_proj"][lp.slot].abs().sum() == 0  # not targeted
    assert s.slot_rank[lp.slot] == 4 and s.slot_modules[lp.slot] == {"q_proj", "v_proj"}


# -- leases, LRU, refcounts -------------------------------------------------------------------------
def _three(tmp_path, reg):
    for i, name in enumerate(("a", "b", "c")):
        reg.register(name, write_lora_files(tmp_path / name, seed=i))


def _slot_A(reg, lease):
    return reg.stacks.A[0]["q_proj"][lease.slot, :4].clone()


def test_lru_eviction_and_no_thrashing(tmp_path):
    reg = make_registry(tmp_path, max_loras=2)
    _three(tmp_path, reg)
    la, lb = reg.acquire("a"), reg.acquire("b")
    assert {la.slot, lb.slot} == {0, 1}
    assert reg.acquire("c") is None  # every slot held: wait, do not evict a running adapter
    a_weights = _slot_A(reg, la)
    la2 = reg.acquire("a")  # already resident: same slot, refcount 2
    assert la2.slot == la.slot and reg.get("a").active_leases == 2
    reg.release(lb)
    lc = reg.acquire("c")  # b idle: evicted to host
    assert lc.slot == lb.slot and reg.get("b").tier == "host" and reg.get("c").tier == "device"
    assert torch.equal(_slot_A(reg, la), a_weights)
    reg.release(la)
    reg.release(la2)
    reg.release(lc)
    # a (released before c) is the LRU idle slot now: b goes there
    lb2 = reg.acquire("b")
    assert lb2.slot == la.slot and reg.get("a").tier == "host"
    reg.release(lb2)
    assert reg.get("b").requests_served == 2 and reg.get("b").last_used is not None
    with pytest.raises(ValueError, match="twice"):
        reg.release(lb2)


def test_host_tier_bounded(tmp_path):
    reg = make_registry(tmp_path, max_loras=1, max_host_adapters=1)
    _three(tmp_path, reg)
    assert [i.tier for i in reg.list()] == ["disk", "disk", "host"]
    lease = reg.acquire("a")  # reloaded from the catalog on disk
    assert reg.get("a").tier == "device" and reg.get("c").tier == "disk"
    reg.release(lease)


def test_unregister_waits_for_in_flight(tmp_path):
    reg = make_registry(tmp_path, max_loras=1)
    _three(tmp_path, reg)
    lease = reg.acquire("a")
    weights = _slot_A(reg, lease)
    reg.unregister("a")
    assert "a" not in reg and not (reg.config.data_dir / "adapters" / "a").exists()
    for call in (lambda: reg.get("a"), lambda: reg.acquire("a"), lambda: reg.unregister("a")):
        with pytest.raises(AdapterError) as e:
            call()
        assert e.value.status == 404
    assert reg.acquire("b") is None  # the in-flight request still owns the only slot
    assert torch.equal(_slot_A(reg, lease), weights)
    reg.register("a", write_lora_files(tmp_path / "a2", seed=9))  # the id is free again at once
    reg.release(lease)  # last lease of the old "a": its slot is freed
    lb = reg.acquire("b")
    assert lb is not None and lb.slot == 0
    reg.release(lb)
    la = reg.acquire("a")
    assert not torch.equal(_slot_A(reg, la), weights)  # the new "a", not the old one
    reg.release(la)
    assert [i.id for i in make_registry(tmp_path).list()] == ["b", "c", "a"]


def test_prefix_lease_uses_no_slot(tmp_path):
    reg = make_registry(tmp_path, max_loras=1)
    reg.register("p", write_prefix_files(tmp_path / "p", num_virtual_tokens=3))
    reg.register("l", write_lora_files(tmp_path / "l"))
    ll = reg.acquire("l")
    lp = reg.acquire("p")  # the only slot is held, a prefix still goes
    assert lp.slot == -1 and lp.kind == "prefix" and ll.kind == "lora" and ll.prefix_kv is None
    s = TINY_SPEC
    assert lp.prefix_kv.shape == (s.num_layers, 2, 3, s.num_kv_heads, s.head_dim)
    info = reg.get("p")
    assert (info.type, info.num_virtual_tokens, info.tier, info.rank) == ("prefix", 3, "device", 0)
    reg.unregister("p")
    assert lp.prefix_kv.abs().sum() > 0  # the lease keeps its tensor
    reg.release(lp)
    reg.release(ll)


def test_broken_catalog_entry_is_reported_and_deletable(tmp_path):
    reg = make_registry(tmp_path)
    reg.register("a", write_lora_files(tmp_path / "a"))
    (reg.config.data_dir / "adapters" / "a" / "adapter_model.safetensors").write_bytes(b"garbage")
    reg2 = make_registry(tmp_path)
    assert reg2.list() == [] and "truncated" in reg2.load_errors["a"]
    with pytest.raises(AdapterError) as e:
        reg2.register("a", write_lora_files(tmp_path / "a3"))
    assert e.value.status == 409 and "delete it first" in e.value.message
    reg2.unregister("a")
    reg2.register("a", tmp_path / "a3")


def test_weights_vanishing_after_registration(tmp_path):
    reg = make_registry(tmp_path, max_host_adapters=1)
    src = write_lora_files(tmp_path / "src")
    reg.register("ref", src, copy=False)
    reg.register("other", write_lora_files(tmp_path / "o"))  # pushes "ref" out of the host tier
    (src / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError) as e:
        reg.acquire("ref")
    assert e.value.status == 500 and "can no longer be loaded" in e.value.message


def test_concurrent_acquire_release(tmp_path):
    reg = make_registry(tmp_path, max_loras=2, max_host_adapters=2)
    names = [f"n{i}" for i in range(5)]
    for i, n in enumerate(names):
        reg.register(n, write_lora_files(tmp_path / n, seed=i))
    seen_errors = []

    def worker(k: int) -> None:
        for j in range(60):
            n = names[(k + j) % len(names)]
            lease = reg.acquire(n)
            if lease is None:
                continue
            owner = reg.residency._slots.owner[lease.slot]
            if owner.adapter_id != n or owner.refcount < 1:
                seen_errors.append((n, owner.adapter_id))
            reg.release(lease)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not seen_errors
    assert all(i.active_leases == 0 for i in reg.list())
    assert sum(i.requests_served for i in reg.list()) > 0


def test_read_tensors_views_one_buffer_and_refuses_what_the_header_misstates(tmp_path):
    """The weights file read once: every tensor as safetensors reads it; a tensor of a dtype run that
    holds one NaN is named; offsets beyond the data, or a size the shape contradicts, are refused."""
    import struct

    from safetensors.torch import save_file

    from loramux.adapters_registry.adapter_files import read_tensors

    tensors = {"a": torch.randn(4, 8), "b": torch.randn(3, 5, dtype=torch.float64),
               "c": torch.randn(6, 2).to(torch.bfloat16), "d": torch.randn(7)}
    path = tmp_path / "adapter_model.safetensors"
    save_file(tensors, str(path))
    got = read_tensors(path, list(tensors))
    expected = load_file(str(path))
    assert all(torch.equal(got[k], expected[k]) and got[k].dtype == expected[k].dtype for k in tensors)
    bad = dict(tensors, d=torch.tensor([1.0, float("nan"), 2.0]))
    save_file(bad, str(path))
    with pytest.raises(AdapterError, match="tensor d contains NaN"):
        read_tensors(path, list(bad))
    save_file({"a": tensors["a"]}, str(path))
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + size])
    for entry in ({**header["a"], "data_offsets": [0, 10_000]}, {**header["a"], "shape": [4, 9]}):
        text = json.dumps({"a": entry}).encode()
        path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size:])
        with pytest.raises(AdapterError, match="bad dtype, shape or offsets"):
            read_tensors(path, ["a"])


def test_a_slot_rewritten_holds_exactly_what_a_fresh_slot_would(tmp_path):
    """A slot zeroes only what its previous adapter wrote beyond the new one's ranks: after a rank-8
    all-target adapter, a rank-4 q/v one leaves the slot as it leaves an untouched slot."""
    from loramux.adapters_registry.formats import inspect_adapter, load_adapter
    from loramux.adapters_registry.slots import LoraStacks

    def weights(folder):
        manifest = inspect_adapter(folder, TINY_SPEC, max_rank=8, max_virtual_tokens=8)
        return load_adapter(folder, manifest, TINY_SPEC, dtype=torch.float32, device=torch.device("cpu"))

    wide = weights(write_lora_files(tmp_path / "wide", r=8, seed=1, targets=(
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")))
    narrow = weights(write_lora_files(tmp_path / "narrow", r=4, seed=2))
    stacks = LoraStacks(TINY_SPEC, 2, 8, dtype=torch.float32, device=torch.device("cpu"))
    stacks.write(0, wide)
    stacks.write(0, narrow)
    stacks.write(1, narrow)
    for layer in range(TINY_SPEC.num_layers):
        for rows in stacks.A_rows[layer].values():
            assert torch.equal(rows[0], rows[1])
        for b in stacks.B[layer].values():
            assert torch.equal(b[0], b[1])
    assert stacks.slot_rank[0] == 4 and stacks.slot_modules[0] == {"q_proj", "v_proj"}
